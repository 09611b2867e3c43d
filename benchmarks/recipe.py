"""Which recovery recipe recovers the most per token? Initialisations and one- vs two-stage distillation at equal
tokens, scored on held-out data.

One placement (``--method``, default ``even``: MambaInLlama's spacing, no diagnosis needed), one budget, one
shared teacher cache; the arms differ only in the recipe:

* ``mapping``: MambaInLlama's mapping (V->x, K->B, Q->C, O->out_proj), logit KD from step 1;
* ``mapping_skip``: the same mapping with ``out_proj`` zeroed (``student.init=attention_skip``): the student
  starts as the base with those attention sublayers skipped, the mixers grow in;
* ``two_stage``: the mapping; the first ``--stage1`` steps align each new mixer alone on the teacher's input
  to its layer (hidden-state MSE, MOHAWK / Puzzle's blockwise local distillation), then logit KD;
* ``two_stage_skip``: both.

Each arm is a placement study of one method (``launchers/placement.py``), so the numbers are the study's own
(held-out KL, perplexity, top-1 / greedy agreement, every ``--eval-every`` steps). The comparison chooses a
default recipe, so ``--heldout`` is the corpus' validation split (docs/corpus.md), never its test split.

    python benchmarks/recipe.py --data runs/corpus-smollm2/train/chat.jsonl \
        --heldout runs/corpus-smollm2/validation/chat.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {
    "mapping": ["--distill.student.init=attention"],
    "mapping_skip": ["--distill.student.init=attention_skip"],
    "two_stage": ["--distill.student.init=attention", "--distill.loss.stage1_steps={stage1}"],
    "two_stage_skip": ["--distill.student.init=attention_skip", "--distill.loss.stage1_steps={stage1}"],
}


def main() -> None:
    from rad_ds.core.provenance import RENDER_HELP, provenance, render_only, write_results

    default_out = ROOT / "benchmarks" / "results" / "recipe_cpu.json"
    if render_only(render, default_out):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--method", default="even")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--stage1", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--work", default=str(ROOT / "runs" / "recipe"))
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    a = ap.parse_args()
    from rad_ds.study import cli
    from rad_ds.teacher_cache import cli as tc_cli

    work = Path(a.work)
    cache = work / "teacher_cache"
    common = ["--model", a.model, "--k", str(a.k), "--data", a.data, "--test", a.heldout, "--split", "validation",
              "--seeds", "0", "--steps", str(a.steps),
              "--seq-len", str(a.seq_len), "--micro-batch", str(a.micro_batch), "--lr", str(a.lr),
              f"--methods={a.method}", f"--eval_every={a.eval_every}", "--distill.no-wandb",
              "--distill.loss.hidden=mse", "--distill.loss.hidden_weight=0", "--distill.optim.warmup_steps=2"]
    # one teacher pass for every arm (the same data settings as the students' runs)
    rc = tc_cli.main(["--teacher", a.model, "--data", a.data, "--seq-len", str(a.seq_len), "--out", str(cache)])
    if rc:
        sys.exit(rc)
    results = {}
    for name in a.arms.split(","):
        extra = [x.format(stage1=a.stage1) for x in ARMS[name]]
        rc = cli.main([*common, "--out", str(work / name), f"--cache_dir={cache}", *extra])
        if rc:
            sys.exit(rc)
        res = json.loads((work / name / "results.json").read_text())
        e = res["k"][str(a.k)][a.method]  # one seed: its scores, in this benchmark's former names
        names = {"heldout_kl": "test_kl", "ppl": "ppl", "top1_agreement": "top1_agreement",
                 "greedy_agreement": "greedy_agreement"}
        results[name] = {"overrides": extra, "layers": e["layers"], **{m: e[r][0] for m, r in names.items()},
                         "initial": {m: e["initial"][r] for m, r in names.items()},
                         "curve": [{"step": s, "tokens": t, "heldout_kl": kl[0], "top1_agreement": t1[0]}
                                   for s, t, kl, t1 in zip(e["curve"]["steps"], e["curve"]["tokens"],
                                                           e["curve"]["test_kl"], e["curve"]["top1_agreement"])]}
    out = Path(a.out)
    summary = {"benchmark": "recipe", "provenance": provenance(), "model": a.model, "k": a.k, "method": a.method,
               "steps": a.steps, "stage1_steps": a.stage1, "seq_len": a.seq_len, "micro_batch": a.micro_batch,
               "lr": a.lr, "data": a.data, "heldout": a.heldout, "arms": results,
               "best": min(results, key=lambda n: results[n]["heldout_kl"]), "chart": out.with_suffix(".png").name}
    print(write_results(out, summary, render).read_text())
    _chart(results, out.with_suffix(".png"), a)


def render(summary: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    results = summary["arms"]
    lines = [f"# Recovery recipes at equal tokens ({summary['model']}, k={summary['k']} `{summary['method']}` layers "
             f"{results[next(iter(results))]['layers']}, {summary['steps']} steps of {summary['micro_batch']} x "
             f"{summary['seq_len']} tokens, lr {summary['lr']})", "",
             "| recipe | held-out KL: init -> final | ppl: init -> final | top-1 agr. | greedy agr. |",
             "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['initial']['heldout_kl']:.3f} -> **{r['heldout_kl']:.3f}** | "
                     f"{r['initial']['ppl']:.2f} -> {r['ppl']:.2f} | {r['top1_agreement']:.3f} | "
                     f"{r['greedy_agreement']:.3f} |")
    lines += ["", f"Best final held-out KL: **{summary['best']}**. Curves: `{summary['chart']}`.", "",
              provenance_line(summary["provenance"])]
    return "\n".join(lines) + "\n"


def _chart(results: dict, path: Path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        tokens = [p["tokens"] for p in r["curve"]]
        axes[0].plot(tokens, [p["heldout_kl"] for p in r["curve"]], marker="o", label=name)
        axes[1].plot(tokens, [p["top1_agreement"] for p in r["curve"]], marker="o", label=name)
    axes[0].set_yscale("log")
    axes[0].set_title("held-out KL(teacher || student), nats/token")
    axes[1].set_title("teacher top-1 agreement")
    for ax in axes:
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Recovery recipes, {a.model}, k={a.k} ({a.method}), stage 1 = {a.stage1} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
