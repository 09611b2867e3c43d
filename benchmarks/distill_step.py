"""Throughput and memory of a distillation step: the DeepSpeed trainer (ZeRO-3; in self-distillation its default
one-copy teacher, the teacher location each run used is recorded) on 1 and 2 ranks against the plain
single-process PyTorch loop doing the same work (``rad_ds.distill.reference``: a teacher model and a student
model, teacher forward + student forward/backward + AdamW, no DeepSpeed).

Each configuration runs in a fresh process (2 ranks through the ``deepspeed`` launcher); the first
``--warmup`` steps are discarded and the rest timed. Reported per configuration: tokens/s (all ranks
together), seconds per step, peak memory per rank (CPU: peak RSS of the process; CUDA: allocator peak),
and the overhead ratio ``plain tokens/s / trainer tokens/s`` at 1 rank (target on CPU: <= 1.3x). On
CUDA also model FLOPs utilisation: (2 N_teacher + 4 N_student + 2 N_trainable) FLOPs per token
(teacher forward, student forward + activation gradients, weight gradients of the trained part),
against ``--peak-tflops``.

The model is a small Llama (default 8 layers, hidden 512, GQA 8/4 heads, vocab 8192; 2 layers replaced
by Mamba2) built locally, or any --model (e.g. embedded:smollm2). Results go to
benchmarks/results/distill_<device>.json and .md.

    python benchmarks/distill_step.py                                  # CPU, fp32, 1 thread per rank
    python benchmarks/distill_step.py --model embedded:smollm2 --layers 22,25 --seq-len 256 --steps 4
    python benchmarks/distill_step.py --device cuda --dtype bfloat16 --seq-len 2048 --micro-batch 8 \\
        --peak-tflops 989 --out benchmarks/results/gpu/distill_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path or embedded:smollm2 (default: a local small Llama)")
    ap.add_argument("--layers", default="2,5", help="layers to replace with Mamba2")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ranks", default="1,2", help="trainer world sizes to run")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of each configuration, interleaved; the fastest counts (the cores may be shared)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak, for MFU (CUDA)")
    ap.add_argument("--out", default=None, help="JSON result file (default benchmarks/results/distill_<device>.json)")
    ap.add_argument("--render", action="store_true", help="only re-render the .md beside --out from that JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return ap.parse_args(argv)


# -- the workload ------------------------------------------------------------------------------------


def prepare(args, work: Path) -> dict:
    """A local small Llama with a byte tokenizer (unless --model) and a text dataset; returns run settings."""
    from tests.distill_helpers import byte_tokenizer, write_text_jsonl

    model = args.model
    if model is None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        heads = max(args.hidden // 64, 2)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                          num_hidden_layers=args.num_layers, num_attention_heads=heads,
                          num_key_value_heads=max(heads // 2, 1), max_position_embeddings=4096,
                          tie_word_embeddings=True)
        m = LlamaForCausalLM(cfg)
        model = str(work / "base")
        m.save_pretrained(model)
        byte_tokenizer().save_pretrained(model)
    # enough long documents that every step is full (rows are packed to seq_len)
    data = write_text_jsonl(work / "data.jsonl", n=max(64, 4 * args.micro_batch * (args.steps + args.warmup) * 4),
                            min_words=args.seq_len // 3, max_words=args.seq_len)
    return {"model": model, "data": str(data)}


def run_settings(args, prep: dict, out: Path, world: int) -> list[str]:
    steps = args.steps + args.warmup
    return [
        "--model", prep["model"], "--layers", args.layers, "--data", prep["data"], "--out", str(out),
        "--steps", str(steps), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
        "--train.global_batch", str(args.micro_batch * max(map(int, args.ranks.split(",")))),
        "--model.dtype", args.dtype, "--no-wandb", "--log.progress=false", "--checkpoint.export_final=false",
        "--loss.hidden_weight=0.1", "--optim.warmup_steps=0", "--data.mask_prompt=false",
    ]


def _worker(args):
    """Runs inside a fresh process: ``plain`` (reference loop) or ``engine`` (the trainer, any world)."""
    import torch

    from rad_ds.distill.tracking import peak_memory_mb

    work = Path(args.workdir)
    prep = json.loads((work / "prep.json").read_text())
    sys.path.insert(0, str(ROOT / "launchers"))
    import distill as launcher  # launchers/distill.py

    if args.worker == "plain":
        from rad_ds.distill.reference import ReferenceDistiller

        cfg = launcher.make_config(run_settings(args, prep, work / f"plain_{args.rep}", 1))
        ref = ReferenceDistiller(cfg, device=args.device)
        rows = ref.run()
        _write_rows(work / "plain.json", rows, peak_memory_mb(), ref)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = launcher.make_config(run_settings(args, prep, work / f"engine{world}_{args.rep}", world))
    from rad_ds.distill import distill

    result = distill(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _write_rows(work / f"engine{world}.json", result.losses, peak_memory_mb(), None,
                    result.summary.get("teacher_placement"))
    torch.distributed.destroy_process_group()


def _param_counts(model_obj) -> dict:
    return {"total": sum(p.numel() for p in model_obj.parameters()),
            "trainable": sum(p.numel() for p in model_obj.parameters() if p.requires_grad)}


def _write_rows(path: Path, rows, mem_mb, ref=None, teacher_placement=None):
    import torch

    info = {"rows": rows, "peak_mem_mb": mem_mb, "torch_threads": torch.get_num_threads(),
            "teacher_placement": "replicated (two plain models)" if ref is not None else teacher_placement}
    if ref is not None:
        info["student_params"] = _param_counts(ref.student)
        info["teacher_params"] = _param_counts(ref.teacher)
    path.write_text(json.dumps(info))


# -- the driver ----------------------------------------------------------------------------------------


def _summarise(info: dict, warmup: int, tokens_per_step: int) -> dict:
    timed = info["rows"][warmup:]
    step_s = [r["step_s"] for r in timed]
    total = sum(step_s)
    return {"steps": len(timed), "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step * len(timed) / total,
            "median_step_s": statistics.median(step_s), "peak_mem_mb_per_rank": info["peak_mem_mb"],
            "torch_threads": info.get("torch_threads"), "tokens_per_s_each_run": info.get("all_runs_tokens_per_s"),
            "teacher_placement": info.get("teacher_placement")}


def _child_env(threads: int) -> dict:
    """The environment of every run: ``threads`` torch threads, offline, and no launcher variables inherited."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _jobs(argv, work: Path, ranks: str) -> list[tuple[str, list[str]]]:
    """(name, command) of each configuration: the plain loop, then the trainer per world size (2+ ranks through the
    ``deepspeed`` launcher), each re-running this script as a worker."""
    me = [sys.executable, str(Path(__file__).resolve())]
    common = [*(argv or sys.argv[1:]), "--workdir", str(work)]
    jobs = [("plain", me + ["--worker", "plain", *common])]
    for w in map(int, ranks.split(",")):
        if w == 1:
            cmd = me + ["--worker", "engine", *common]
        else:
            from tests.distill_helpers import free_port

            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(w), "--master_port",
                   str(free_port()), str(Path(__file__).resolve()), "--worker", "engine", *common]
        jobs.append((f"engine{w}", cmd))
    return jobs


def _run_jobs(jobs, repeats: int, env: dict, work: Path) -> dict[str, list]:
    """Every job ``repeats`` times, interleaved; each run's written rows per job name."""
    runs: dict[str, list] = {}
    for rep in range(repeats):
        for name, cmd in jobs:
            print(f"== {name} (run {rep + 1}/{repeats}): {' '.join(cmd[:6])} ...", flush=True)
            r = subprocess.run(cmd + ["--rep", str(rep)], env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=3600)
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} failed ({r.returncode})")
            runs.setdefault(name, []).append(json.loads((work / f"{name}.json").read_text()))
    return runs


def _fastest(infos: list, warmup: int) -> dict:
    """The run with the least timed seconds, with every run's tokens/s beside it."""
    best = min(infos, key=lambda i: sum(r["step_s"] for r in i["rows"][warmup:]))
    best["all_runs_tokens_per_s"] = [
        sum(r["tokens_per_s"] * r["step_s"] for r in i["rows"][warmup:])
        / sum(r["step_s"] for r in i["rows"][warmup:]) for i in infos]
    return best


def _compare(results: dict, args, world_max: int) -> tuple[dict, int | None]:
    """(per-configuration summaries plus overhead at 1 rank, scaling and MFU; the tokens per step)."""
    tokens_per_step = None
    summary = {}
    for name, info in results.items():
        rows = info["rows"]
        # every row is full: tokens per step = the real tokens of the global batch (same for all runs)
        tps = round(statistics.median(r["tokens_per_s"] * r["step_s"] for r in rows))
        tokens_per_step = tokens_per_step or tps
        summary[name] = _summarise(info, args.warmup, tps)
    if "plain" in summary and "engine1" in summary:
        summary["overhead_1rank"] = summary["plain"]["tokens_per_s"] / summary["engine1"]["tokens_per_s"]
    if "engine1" in summary and f"engine{world_max}" in summary and world_max > 1:
        summary[f"scaling_{world_max}ranks"] = (summary[f"engine{world_max}"]["tokens_per_s"]
                                               / summary["engine1"]["tokens_per_s"])
    params = results.get("plain", {}).get("student_params")
    if args.peak_tflops and params:
        t_params = results["plain"]["teacher_params"]["total"]
        flops_per_token = 2 * t_params + 4 * params["total"] + 2 * params["trainable"]
        for name in summary:
            if name.startswith("engine"):
                w = int(name[6:])
                summary[name]["mfu"] = (flops_per_token * summary[name]["tokens_per_s"]
                                        / (w * args.peak_tflops * 1e12))
    return summary, tokens_per_step


def main(argv=None):
    from rad_ds.core.provenance import provenance, render_only, write_results

    if render_only(render, ROOT / "benchmarks" / "results" / "distill_cpu.json", argv):
        return 0
    args = parse_args(argv)
    if args.worker:
        return _worker(args)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"distill_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = _child_env(args.threads)
    with tempfile.TemporaryDirectory(prefix="rad_ds_bench_") as tmp:
        work = Path(tmp)
        prep = prepare(args, work)
        (work / "prep.json").write_text(json.dumps(prep))
        runs = _run_jobs(_jobs(argv, work, args.ranks), args.repeats, env, work)
        results = {name: _fastest(infos, args.warmup) for name, infos in runs.items()}
    world_max = max(map(int, args.ranks.split(",")))
    summary, tokens_per_step = _compare(results, args, world_max)
    doc = {
        "benchmark": "distill_step", "provenance": provenance(), "device": args.device, "dtype": args.dtype,
        "threads_per_rank": args.threads, "cpu_count": os.cpu_count(),
        "model": args.model or f"llama(hidden={args.hidden}, layers={args.num_layers}, vocab={args.vocab})",
        "replaced_layers": args.layers, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "global_batch": args.micro_batch * world_max, "tokens_per_step": tokens_per_step, "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "params": results.get("plain", {}).get("student_params"),
        "summary": summary,
    }
    print(write_results(out, doc, render).read_text())
    return 0


def render(doc: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    summary, params = doc["summary"], doc["params"]
    world_max = max((int(n[6:]) for n in summary if n.startswith("engine")), default=1)
    lines = [
        f"# Distillation step ({doc['device']}, {doc['dtype']}, {doc['threads_per_rank']} thread(s) per rank)", "",
        f"Model {doc['model']}, layers {doc['replaced_layers']} replaced; seq_len {doc['seq_len']}, global batch "
        f"{doc['global_batch']} sequences ({doc['tokens_per_step']} tokens) per step, {doc['steps']} timed steps "
        f"after {doc['warmup']} warm-up; the fastest of {doc['repeats']} interleaved runs per row. Student "
        f"{params and params['total']:,} parameters, {params and params['trainable']:,} trainable. Peak memory = "
        "peak RSS per process (CPU). The plain loop is `rad_ds.distill.reference` (what a user would write: a "
        "teacher model and a student model, no DeepSpeed).", "",
        "| run | teacher | ranks | tokens/s | s/step (median) | peak memory per rank (MiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        if isinstance(s, dict):
            ranks = 1 if name == "plain" else int(name[6:])
            label = "plain PyTorch loop" if name == "plain" else "rad-ds trainer (DeepSpeed ZeRO-3)"
            lines.append(f"| {label} | {s.get('teacher_placement') or '?'} | {ranks} | {s['tokens_per_s']:.0f} | "
                         f"{s['median_step_s']:.3f} | {s['peak_mem_mb_per_rank']:.0f} |")
    if "overhead_1rank" in summary:
        lines += ["", f"Overhead at 1 rank (plain tokens/s / trainer tokens/s): **{summary['overhead_1rank']:.2f}x** "
                      "(target <= 1.3x)."]
    if f"scaling_{world_max}ranks" in summary:
        lines.append(f"Throughput {world_max} ranks / 1 rank: {summary[f'scaling_{world_max}ranks']:.2f}x.")
    lines += ["", provenance_line(doc["provenance"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
