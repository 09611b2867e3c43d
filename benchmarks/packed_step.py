"""Training-step time with document boundaries (packed rows, ``position_ids`` restarting at 0) vs the
same rows without them (plain causal attention, one running Mamba2 state), on the same model and data.

A SmolLM2-135M-shaped hybrid (hidden 576, 9/3 heads of 64, MLP 1536, vocab 49152) with fewer layers,
half of them Mamba2; rows of ``--seq-len`` tokens packed with documents of chat-like lengths; forward +
backward of the LM loss, median of ``--repeats`` after a warm-up. Writes a markdown table and a JSON.

    python benchmarks/packed_step.py --out benchmarks/results/packed_step_cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "packed_step_cpu.json"


def build(layers: int, vocab: int):
    from rad_ds.models import RadHybridConfig, RadHybridForCausalLM

    cfg = RadHybridConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          layer_types=[("attention", "mamba2")[i % 2] for i in range(layers)])
    torch.manual_seed(0)
    return RadHybridForCausalLM(cfg)


def packed_rows(batch: int, seq_len: int, vocab: int, seed: int = 0):
    """Rows filled with documents of 40..300 tokens (the last one cut to fit), and their position_ids."""
    g = torch.Generator().manual_seed(seed)
    pos, n_docs = [], 0
    for _ in range(batch):
        row = []
        while len(row) < seq_len:
            n = int(torch.randint(40, 300, (1,), generator=g))
            row += list(range(min(n, seq_len - len(row))))
            n_docs += 1
        pos.append(row)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    return ids, torch.tensor(pos), n_docs


def step_time(model, ids, pos, repeats: int) -> float:
    def once():
        model.zero_grad(set_to_none=True)
        out = model(ids, position_ids=pos, labels=ids)
        out.loss.backward()

    once()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def render(res: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    md = ["# Training step with and without document boundaries (CPU)", "",
          f"{res['model']}; batch {res['batch']} x {res['seq_len']} tokens holding {res['documents']} documents; "
          f"forward + backward of the LM loss, median of {res['repeats']}, {res['threads']} threads.",
          "", "| rows | step (s) |", "|---|---:|",
          f"| plain (documents see each other) | {res['step_s_without_boundaries']:.3f} |",
          f"| packed (block-diagonal attention, Mamba2 state reset) | {res['step_s_with_boundaries']:.3f} |",
          "", f"Ratio packed / plain: **{res['ratio']:.3f}** (target <= 1.10).", "",
          provenance_line(res["provenance"])]
    return "\n".join(md) + "\n"


def main():
    from rad_ds.core.provenance import RENDER_HELP, provenance, render_only, write_results

    if render_only(render, DEFAULT_OUT):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.vocab).train()
    ids, pos, n_docs = packed_rows(args.batch, args.seq_len, args.vocab)
    plain = step_time(model, ids, None, args.repeats)
    packed = step_time(model, ids, pos, args.repeats)
    res = {"provenance": provenance(),
           "model": f"SmolLM2-135M-shaped, {args.layers} layers (half Mamba2), vocab {args.vocab}",
           "batch": args.batch, "seq_len": args.seq_len, "documents": n_docs, "threads": args.threads,
           "repeats": args.repeats, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "step_s_without_boundaries": plain, "step_s_with_boundaries": packed, "ratio": packed / plain}
    print(write_results(args.out, res, render).read_text())


if __name__ == "__main__":
    main()
