"""One-copy self-distillation vs a separate teacher engine: parameter memory and step time.

The same student, data, steps and seed distilled twice in this process (DeepSpeed ZeRO-3 over a gloo
group of one): ``teacher.location=shared`` (the teacher is the student's own stack with the original
attention at the replaced layers; the layers below the first replaced one run once for both) against
``teacher.location=zero3`` (a second, separate engine holding the base again: what every peer toolkit
does). A SmolLM2-shaped model (hidden 576, 9/3 heads, MLP 1536) of 12 layers with layers 8 and 10 replaced
(the first replaced layer at 2/3 of the depth), with SmolLM2's vocabulary (49152) and a small one (8192).
Parameter memory = the elements both engines hold; step time = median over the steps after the first.

Bound: with the first replaced layer at depth fraction f, in units of one forward through the layers, the
two-engine step costs teacher forward 1 + student forward 1 + student backward ~2(1-f) (nothing below the
first replaced layer needs a gradient); one copy costs the shared prefix f + teacher rest (1-f) + student
rest (1-f) + backward 2(1-f). Ratio (1 + 3(1-f)) / (2 + 2(1-f)): 0.75 at f = 2/3, before the LM heads and
the loss, which both paths pay alike and which pull the measured ratio towards 1.

    python benchmarks/one_copy.py --out benchmarks/results/one_copy_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152)
LAYERS = [8, 10]


def make_base(d: Path, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.distill_helpers import byte_tokenizer

    out = d / f"base_{vocab}"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(**{**SHAPE, "vocab_size": vocab}, tie_word_embeddings=True, max_position_embeddings=2048)
        LlamaForCausalLM(cfg).save_pretrained(out)
        byte_tokenizer().save_pretrained(out)
    return out


def run(base: Path, data: Path, out: Path, placement: str, steps: int, seq_len: int, micro: int,
        dtype: str) -> dict:
    import shutil

    from rad_ds.distill import distill
    from tests.distill_helpers import load_launcher

    shutil.rmtree(out, ignore_errors=True)
    args = ["--model", str(base), "--layers", ",".join(map(str, LAYERS)), "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--seq-len", str(seq_len), "--micro-batch", str(micro), "--no-wandb",
            "--log.progress=false", "--loss.hidden_weight=0.5", "--checkpoint.every=1000",
            "--checkpoint.export_final=false", f"--teacher.location={placement}", f"--model.dtype={dtype}"]
    result = distill(load_launcher("distill").make_config(args))
    mod = result.engine.module
    held = sum(getattr(p, "ds_numel", p.numel()) for p in mod.parameters())
    if placement != "shared":
        from rad_ds.distill.teacher_location import param_count
        from rad_ds.models.conversion import load_config

        held += param_count(load_config(base))  # the teacher engine's copy
    times = [r["step_s"] for r in result.losses[1:]]
    return {"placement": placement, "param_elements": held, "step_s_median": statistics.median(times),
            "step_s": times, "losses": [r["loss"] for r in result.losses]}


def main() -> None:
    from rad_ds.core.provenance import RENDER_HELP, provenance, render_only, write_results

    default_out = ROOT / "benchmarks" / "results" / "one_copy_cpu.json"
    if render_only(render, default_out):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/rad_ds_one_copy")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vocabs", default="49152,8192", help="vocabulary sizes (the LM head's share of a step)")
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    a = ap.parse_args()
    import torch

    from tests.distill_helpers import write_text_jsonl

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = write_text_jsonl(work / "text.jsonl", n=400, min_words=20, max_words=120)
    results = []
    for vocab in map(int, a.vocabs.split(",")):
        base = make_base(work, vocab)
        rows = {p: run(base, data, work / f"{p}_{vocab}", p, a.steps, a.seq_len, a.micro_batch, a.dtype)
                for p in ("zero3", "shared")}
        one, two = rows["shared"], rows["zero3"]
        results.append({
            "vocab": vocab, "rows": rows, "param_memory_ratio": one["param_elements"] / two["param_elements"],
            "step_time_ratio": one["step_s_median"] / two["step_s_median"],
            "max_loss_rel_diff": max(abs(x - y) / abs(y) for x, y in zip(one["losses"], two["losses"]))})
    result = {"benchmark": "one_copy", "provenance": provenance(), "shape": SHAPE, "layers": LAYERS,
              "first_replaced_fraction": LAYERS[0] / 12, "dtype": a.dtype, "seq_len": a.seq_len,
              "micro_batch": a.micro_batch, "steps": a.steps,
              "results": results, "targets": {"param_memory_ratio": 0.5, "step_time_ratio": 0.75},
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    print(write_results(a.out, result, render).read_text())


def render(result: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    t = result["targets"]
    md = [f"# One-copy self-distillation vs two engines ({result['shape']['num_hidden_layers']} layers, replaced "
          f"{result['layers']}, {result['dtype']}, {result['micro_batch']} x {result['seq_len']} tokens per step)", "",
          "| vocab | placement | parameter elements held | median step (s) |", "|---:|---|---:|---:|"]
    for r in result["results"]:
        md += [f"| {r['vocab']} | {p} | {r['rows'][p]['param_elements']:,} | {r['rows'][p]['step_s_median']:.3f} |"
               for p in ("zero3", "shared")]
    md.append("")
    md += [f"vocab {r['vocab']}: parameter memory ratio **{r['param_memory_ratio']:.3f}** (target about "
           f"{t['param_memory_ratio']}), step time ratio **{r['step_time_ratio']:.3f}** (target <= "
           f"{t['step_time_ratio']}), losses agree to {r['max_loss_rel_diff']:.1e}" for r in result["results"]]
    md += ["", provenance_line(result["provenance"])]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
