"""Off-policy vs on-policy (GKD lambda = 0.5) distillation: held-out KL after equal training tokens.

SmolLM2-135M-Instruct (embedded), layers 22 and 25 replaced by Mamba2 (the README demo's student, its losses
and learning rate), the bundled demo chats split by conversation: 128 for training, 32 held out and never
trained on. Two runs from the same init, seed and data order, on one process (DeepSpeed ZeRO-3 over a gloo
group of one):

* off-policy: ``on_policy.lmbda=0``, ``--steps`` steps on the data's conversations;
* on-policy: ``on_policy.lmbda=0.5``: on about half of the steps the student completes the batch's prompts
  (up to ``--max-new-tokens`` tokens, temperature 1) and is trained on its own tokens. It runs until it has
  trained on as many tokens as the off-policy run (the trainer's ``tokens``: real tokens of the step
  batches; on an on-policy step, prompts plus completions), to the step nearest that budget.

Constant learning rate after the warmup, so the two step counts do not change the schedule. Before the first
step and every ``--eval-every`` steps: held-out KL(teacher || student) per assistant token, teacher-forced on
the held-out conversations. Before and after: the same KL on the student's own completions of the held-out
prompts (fixed seeds, temperature 1), the distribution on-policy training targets.

    source scripts/env.sh && python benchmarks/on_policy.py
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS = [22, 25]


def split_chats(src: Path, work: Path, held_out: int, seed: int) -> tuple[Path, Path]:
    """The demo chats split by conversation: (train.jsonl, heldout.jsonl)."""
    lines = [x for x in src.read_text().splitlines() if x.strip()]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    held = set(order[:held_out])
    train, test = work / "train.jsonl", work / "heldout.jsonl"
    train.write_text("".join(lines[i] + "\n" for i in range(len(lines)) if i not in held))
    test.write_text("".join(lines[i] + "\n" for i in sorted(held)))
    return train, test


def run_args(a, train: Path, out: Path, lmbda: float, steps: int) -> list[str]:
    return ["--model", "embedded:smollm2", "--layers", ",".join(map(str, LAYERS)), "--data", str(train),
            "--out", str(out), "--steps", str(steps), "--seq-len", str(a.seq_len), "--micro-batch", "2",
            "--grad-accum", "2", "--lr", "1e-3", "--optim.warmup_steps=2", "--optim.schedule=constant",
            "--loss.kd=forward_kl", "--loss.hidden=cosine", "--loss.hidden_weight=1.0", "--no-wandb",
            "--log.progress=false", "--checkpoint.every=0", "--checkpoint.keep=1", "--checkpoint.export_final=false",
            f"--on_policy.lmbda={lmbda}", f"--on_policy.max_new_tokens={a.max_new_tokens}", "--train.seed=0"]


class HeldOut:
    """Held-out KL(teacher || student) per counted token, through the one-copy engine's module (both streams)."""

    def __init__(self, cfg, tok, path: Path, seq_len: int, max_new_tokens: int, batch: int = 8):
        import copy

        import numpy as np
        import torch

        from rad_ds.data import MicroBatch, build_packed

        dcfg = copy.deepcopy(cfg.data)
        dcfg.path, dcfg.packing, dcfg.seq_len = str(path), "none", seq_len  # one conversation per row
        p = build_packed(dcfg, tok)
        self.n_conversations = len(p)
        self.rows = [MicroBatch(*(torch.from_numpy(x[i:i + batch].astype(t)) for x, t in (
            (p.input_ids, np.int64), (p.target, bool), (p.token, bool), (p.position_ids, np.int64))))
            for i in range(0, len(p), batch)]
        self.max_new_tokens, self.tok = max_new_tokens, tok

    @staticmethod
    def _trim(mb):
        from rad_ds.data import MicroBatch

        w = int(mb.token.sum(1).max())
        return MicroBatch(mb.input_ids[:, :w], mb.target[:, :w], mb.token[:, :w], mb.position_ids[:, :w])

    def _kl(self, module, batches) -> tuple[float, int]:
        import torch

        from rad_ds.distill.losses import kd_loss_sum
        from rad_ds.distill.on_policy import zero3_forward_scope

        total, n = 0.0, 0
        was = module.training
        module.eval()
        with torch.no_grad(), zero3_forward_scope(module):
            for mb in batches:
                out = module(mb.input_ids, position_ids=mb.position_ids)
                total += float(kd_loss_sum(out.logits, out.teacher_logits, mb.target, "forward_kl"))
                n += int(mb.target.sum())
        module.train(was)
        return total / n, n

    def teacher_forced(self, engine) -> tuple[float, int]:
        return self._kl(engine.module, [self._trim(mb) for mb in self.rows])

    def own_samples(self, engine) -> tuple[float, int]:
        """KL on the student's completions of the held-out prompts (seeds fixed: the same draws for every model)."""
        from rad_ds.decoding.eos import model_eos_ids
        from rad_ds.distill.on_policy import (
            build_rows,
            extract_prompts,
            generate_completions,
            generation_model,
            sample_seed,
        )

        model = generation_model(engine)
        prompts = []
        for i, mb in enumerate(self.rows):
            prompts += extract_prompts(mb, [i * 1000 + r for r in range(mb.input_ids.size(0))], 0, 4)
        eos = model_eos_ids(self.tok, model)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(eos)
        done = generate_completions(model, [p.ids for p in prompts], [sample_seed(0, 0, p.row, p.doc) for p in prompts],
                                    self.max_new_tokens, 1.0, eos, pad, engine.device)
        pairs = list(zip([p.ids for p in prompts], done))
        return self._kl(engine.module, [build_rows(pairs[i:i + 8], pad) for i in range(0, len(pairs), 8)])


def _run_class(heldout_path: Path, a, budget: int | None):
    """The trainer's run, plus the held-out set, a count of the positions with a logit loss, and a stop at the step
    whose token count lies closest to ``budget`` (when given)."""
    from rad_ds.distill.run import DistillRun

    class Run(DistillRun):
        def setup(self):
            done = super().setup()
            self.heldout = HeldOut(self.cfg, self.tok, heldout_path, a.seq_len, a.max_new_tokens)
            self.targets_seen = 0
            replace = self.on_policy.maybe_replace

            def counted(step, batch):  # the positions with a logit loss, on top of the trainer's `tokens`
                batch = replace(step, batch)
                self.targets_seen += batch.n_target
                return batch

            self.on_policy.maybe_replace = counted
            return done

        def stop_reached(self, step):
            # the step whose token count lies closest to the budget (steps differ in tokens)
            per_step = self.tokens_run / max(step - self.start_step, 1)
            return super().stop_reached(step) or (budget is not None and self.tokens_seen + per_step / 2 >= budget)

    return Run


def _evaluate_callback(eval_every: int):
    """A callback recording the held-out KL before the first step, every ``eval_every`` steps and at the last, and
    the KL on the student's own samples before the first step and after the last."""
    from rad_ds.distill.callbacks import Callback

    class Evaluate(Callback):
        def __init__(self):
            self.curve, self.own = [], []

        def evaluate(self, step):
            t0 = time.perf_counter()
            kl, n = self.run.heldout.teacher_forced(self.run.student)
            self.curve.append({"step": step, "tokens": self.run.tokens_seen, "targets": self.run.targets_seen,
                               "kl": kl, "eval_s": time.perf_counter() - t0})
            print(f"  step {step:3d}  tokens {self.run.tokens_seen:6d}  held-out KL {kl:.4f}", flush=True)

        def own_samples(self, step):
            kl, n = self.run.heldout.own_samples(self.run.student)
            self.own.append({"step": step, "kl": kl, "generated_tokens": n})
            print(f"  step {step:3d}  KL on own samples of held-out prompts {kl:.4f} ({n} tokens)", flush=True)

        def on_step_start(self, step):
            if not self.curve:
                self.evaluate(step - 1)
                self.own_samples(step - 1)

        def on_step_end(self, step, row):
            last = self.run.stop_reached(step) or step == self.run.cfg.train.steps
            if step % eval_every == 0 or last:
                self.evaluate(step)
            if last:
                self.own_samples(step)

    return Evaluate()


def _run_summary(cfg, run, ev, result, wall_s: float) -> dict:
    """What one run reports: steps, tokens, seconds, the held-out curve and the per-step losses."""
    rows = result.losses
    eval_s = sum(c["eval_s"] for c in ev.curve)
    return {
        "lmbda": cfg.on_policy.lmbda, "steps": len(rows), "on_policy_steps": sum(r.get("onpolicy", 0) for r in rows),
        "tokens": run.tokens_seen, "target_tokens": run.targets_seen,
        "generated_tokens": sum(r.get("gen_tokens", 0) for r in rows),
        "train_s": sum(r["step_s"] for r in rows), "gen_s": sum(r.get("gen_s", 0.0) for r in rows),
        "wall_s": wall_s, "eval_s": eval_s,
        "held_out_conversations": run.heldout.n_conversations, "curve": ev.curve, "own_samples": ev.own,
        "losses": [{k: r.get(k) for k in ("step", "loss", "kd", "hidden", "onpolicy", "gen_s", "tokens")}
                   for r in rows],
    }


def distill_run(cfg, heldout_path: Path, a, budget: int | None):
    """One run (in this process) with held-out evaluations; stops at ``budget`` tokens when given."""
    import torch

    from rad_ds.core.dist import init_distributed, release_env
    from rad_ds.core.io import ProvisionalDir
    from rad_ds.core.outputs import claim
    from rad_ds.distill.run import _quiet

    Run = _run_class(heldout_path, a, budget)
    cfg.validate()
    _quiet()
    info = init_distributed(cfg.train.dist_timeout_s, deepspeed=True)
    t0 = time.perf_counter()
    try:
        with ProvisionalDir(cfg.out, owner=True) as out_dir, \
                claim(cfg.out, "distill", overwrite=cfg.overwrite, rank=info.rank) as output:
            run = Run(cfg, info, out_dir, output)
            ev = _evaluate_callback(a.eval_every)
            run.add_callback(ev)
            result = run.run()
    finally:
        release_env()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return _run_summary(cfg, run, ev, result, time.perf_counter() - t0)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot([c["tokens"] for c in r["curve"]], [c["kl"] for c in r["curve"]], marker="o",
                label=f"{name} (lambda={r['lmbda']})")
    ax.set_xlabel("tokens trained on")
    ax.set_ylabel("held-out KL(teacher || student) per token")
    ax.set_title("SmolLM2-135M, layers 22+25 -> Mamba2, demo chats")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    from rad_ds.core.provenance import RENDER_HELP, provenance, render_only, write_results

    default_out = ROOT / "benchmarks" / "results" / "on_policy_cpu.json"
    if render_only(render, default_out):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/rad_ds_on_policy")
    ap.add_argument("--steps", type=int, default=24, help="off-policy steps (they set the token budget)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    a = ap.parse_args()
    import torch

    from rad_ds.data.demo import DEMO_CHAT
    from rad_ds.distill.cli import make_config

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train, heldout = split_chats(DEMO_CHAT, work, a.held_out, seed=0)
    t_all = time.perf_counter()
    results = {}
    print(f"off-policy: {a.steps} steps", flush=True)
    results["off-policy"] = distill_run(make_config(run_args(a, train, work / "off", 0.0, a.steps)), heldout, a, None)
    budget = results["off-policy"]["tokens"]
    print(f"on-policy: until {budget} tokens", flush=True)
    results["on-policy"] = distill_run(make_config(run_args(a, train, work / "on", 0.5, 4 * a.steps)), heldout, a,
                                       budget)
    total_s = time.perf_counter() - t_all
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    has_png = plot(results, png)
    report = {"benchmark": "on_policy", "provenance": provenance(), "model": "embedded:smollm2", "layers": LAYERS,
              "seq_len": a.seq_len, "global_batch": 4, "max_new_tokens": a.max_new_tokens, "temperature": 1.0,
              "lr": 1e-3, "loss": "forward_kl + cosine hidden (weight 1)", "token_budget": budget, "total_s": total_s,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "chart": png.name if has_png else None, "results": results}
    print(write_results(out, report, render).read_text())


def render(report: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    results = report["results"]
    off = results["off-policy"]
    md = [f"# Off-policy vs on-policy (lambda 0.5) distillation, equal training tokens ({report['machine']}, "
          f"{report['threads']} threads)", "",
          f"SmolLM2-135M-Instruct, layers {report['layers']} replaced by Mamba2, demo chats: "
          f"{off['held_out_conversations']} conversations held out, the rest trained on; global batch "
          f"{report['global_batch']} x {report['seq_len']} tokens, lr {report['lr']:g} constant, forward KL + cosine "
          f"hidden loss; on-policy steps sample up to {report['max_new_tokens']} tokens at temperature "
          f"{report['temperature']:g}. {report['total_s'] / 60:.1f} min in all.", "",
          "| run | steps (on-policy) | tokens trained on | KD positions | generated tokens | train s | of it "
          "generating s | held-out KL start -> end | KL on own samples start -> end |",
          "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, r in results.items():
        md.append(f"| {name} | {r['steps']} ({r['on_policy_steps']}) | {r['tokens']} | {r['target_tokens']} | "
                  f"{r['generated_tokens']} | {r['train_s']:.0f} | {r['gen_s']:.0f} | "
                  f"{r['curve'][0]['kl']:.4f} -> **{r['curve'][-1]['kl']:.4f}** | "
                  f"{r['own_samples'][0]['kl']:.4f} -> **{r['own_samples'][-1]['kl']:.4f}** |")
    md += ["", "Held-out KL(teacher || student) per assistant token, teacher-forced, by tokens trained on:", "",
           "| run | step | tokens trained on | KD positions | held-out KL |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        md += [f"| {name} | {c['step']} | {c['tokens']} | {c['targets']} | {c['kl']:.4f} |" for c in r["curve"]]
    if report.get("chart"):
        md += ["", f"![held-out KL by tokens]({report['chart']})"]
    md += ["", provenance_line(report["provenance"])]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
