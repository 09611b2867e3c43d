"""Evaluate base, student and teacher side by side: GSM8K-style math, HumanEval and CRUXEval-style code
(generated code runs in a sandbox), perplexity, and decoding speed (plain, and self-speculative with a
diagnosis mask). Writes OUT/results.json, OUT/results.md and OUT/samples/<model>/<task>.jsonl.

    # one process (CPU or one GPU)
    python launchers/evaluate.py --model embedded:smollm2 --model runs/student \\
        --tasks gsm8k,humaneval,cruxeval,ppl,speed --limit 20 --out runs/eval
    # local data: --data FILE (when one task reads data) or --data TASK=FILE, repeatable
    python launchers/evaluate.py --model runs/student --tasks gsm8k,ppl \\
        --data gsm8k=gsm8k_test.jsonl --data ppl=wiki.txt --few-shot 8 --out runs/eval
    # speed with the diagnosis mask (self-speculative decoding of the base model)
    python launchers/evaluate.py --model embedded:smollm2 --tasks speed --report runs/diag/report.json --k 4 \\
        --out runs/eval
    # 2 ranks on one node (batches sharded, records gathered: same scores as one process)
    deepspeed --num_gpus 2 launchers/evaluate.py --model DIR --tasks gsm8k,humaneval --out runs/eval
    torchrun --standalone --nproc_per_node 2 launchers/evaluate.py --model DIR --tasks gsm8k --out runs/eval
    # several nodes
    deepspeed --hostfile hostfile launchers/evaluate.py --model DIR --tasks gsm8k,humaneval,ppl --out runs/eval

Tasks: gsm8k (exact match), humaneval (pass@1), cruxeval (output prediction, pass@1), ppl (perplexity),
speed (tokens/s). Greedy decoding everywhere; chat template applied when the tokenizer has one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rad_ds.cli import run_cli  # noqa: E402

TASKS = ("gsm8k", "humaneval", "cruxeval", "ppl", "speed")  # = rad_ds.eval.runner.TASKS (checked by a test)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help="model dir, .gguf file or embedded:smollm2; repeat for side-by-side results")
    ap.add_argument("--tasks", default="gsm8k,humaneval,ppl", help=f"comma list of {','.join(TASKS)}, or all")
    ap.add_argument("--data", action="append", default=[], metavar="[TASK=]FILE",
                    help="local jsonl/json/parquet/csv/txt for a task (gsm8k: question, answer '#### N'; humaneval: "
                         "task_id, prompt, entry_point, test; cruxeval: code, input, output; ppl: text; speed: "
                         "prompts); repeatable")
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each task (ppl: documents)")
    ap.add_argument("--out", required=True, help="output directory (results.json, results.md, samples/)")
    ap.add_argument("--few-shot", type=int, default=0, help="GSM8K chain-of-thought exemplars (0-8)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="generated tokens per sample (default per task: gsm8k 256, humaneval 384, cruxeval 64, "
                         "speed 64)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call (left-padded)")
    ap.add_argument("--no-chat", action="store_true",
                    help="plain-text prompts even if the tokenizer has a chat template")
    ap.add_argument("--seed", type=int, default=0, help="seed of generated data (reasoning-gym) and prompt choice")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--report", default=None, help="diagnosis report.json: speed also runs self-speculative decoding")
    ap.add_argument("--k", type=int, default=None, help="with --report: the k of the skip mask to use")
    ap.add_argument("--skip-layers", default=None, help="or an explicit draft mask of attention layers, e.g. 3,5,9")
    ap.add_argument("--speed-prompts", type=int, default=4, help="prompts decoded by the speed task")
    ap.add_argument("--draft-len", type=int, default=4, help="tokens drafted per round (speculative decoding)")
    ap.add_argument("--ppl-window", type=int, default=1024, help="tokens per perplexity window (<= the model's context)")
    ap.add_argument("--ppl-stride", type=int, default=None, help="perplexity window stride (default: the window)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per generated program in the sandbox")
    ap.add_argument("--sandbox-memory-mb", type=int, default=1024, help="address-space limit of a generated program")
    ap.add_argument("--sandbox-workers", type=int, default=2, help="generated programs run at once")
    ap.add_argument("--sandbox-python", default=None,
                    help="interpreter for generated code (default: this one), e.g. /usr/bin/python3")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--wandb", action="store_true", help="log to wandb (offline unless WANDB_MODE says otherwise)")
    ap.add_argument("--wandb-project", default="rad-ds")
    ap.add_argument("--wandb-run", default=None)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed
    return ap.parse_args(argv)


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip().lower() for t in text.split(",") if t.strip()]
    return list(TASKS) if tasks == ["all"] else tasks


def parse_data(values: list[str], tasks: list[str]) -> dict[str, str]:
    """``TASK=FILE`` pairs, or one bare ``FILE`` when exactly one of the tasks reads data."""
    out = {}
    for v in values:
        task, sep, path = v.partition("=")
        if sep and task.strip().lower() in TASKS:
            task = task.strip().lower()
        else:
            readers = [t for t in tasks if t in TASKS]
            if len(readers) != 1:
                raise ValueError(f"--data {v}: say which task it is for, e.g. --data gsm8k={v} "
                                 f"(tasks: {','.join(tasks)})")
            task, path = readers[0], v
        if task in out:
            raise ValueError(f"--data: two files for {task} ({out[task]}, {path})")
        out[task] = path
    return out


def parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--skip-layers {text!r}: give layer indices, e.g. 3,5,9") from None


def main(argv=None):
    args = parse_args(argv)
    from rad_ds.eval.runner import EvalConfig, evaluate

    tasks = parse_tasks(args.tasks)
    cfg = EvalConfig(
        models=args.model, out=args.out, tasks=tasks, data=parse_data(args.data, tasks), limit=args.limit,
        few_shot=args.few_shot, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        chat=not args.no_chat, seed=args.seed, dtype=args.dtype, report=args.report, k=args.k,
        skip_layers=parse_layers(args.skip_layers), speed_prompts=args.speed_prompts, draft_len=args.draft_len,
        ppl_window=args.ppl_window, ppl_stride=args.ppl_stride, timeout=args.timeout,
        sandbox_memory_mb=args.sandbox_memory_mb, sandbox_workers=args.sandbox_workers,
        sandbox_python=args.sandbox_python, wandb=args.wandb,
        wandb_project=args.wandb_project, wandb_run=args.wandb_run, progress=not args.no_progress,
    )
    evaluate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
