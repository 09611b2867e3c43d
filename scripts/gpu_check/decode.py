"""The ``decode`` step of the GPU check: the hybrid against its all-attention base, decoding one token at a time with
``StaticDecoder`` (a CUDA graph of the whole step on CUDA), at long contexts and batch 1 and 8, against what the
device's memory bandwidth allows.

Both models are SmolLM2-135M-shaped (30 layers, hidden 576, 9/3 heads of 64, MLP 1536, vocab 49152) with random
weights: decode speed does not depend on the weights, and the embedded GGUF (98 MB) cannot travel to the device.
The hybrid replaces 3/4 of the attention layers (22 of 30) by Mamba2, spread over the depth. The state is filled
with random values at ``context`` positions instead of a prefill (a step reads the same bytes whatever the state
holds), so a 32k context costs no 32k-token prefill. A step must read the weights once and every row's state:
bytes per step = weights + every state buffer of the decoder; limit tokens/s = batch x copy bandwidth / bytes per
step; share = measured / limit.

    python scripts/gpu_check/decode.py --device cuda --dtype bfloat16 --contexts 4096,16384,32768 --batches 1,8 \
        --out decode.json        # the .md beside it is rendered from the JSON; --plot decode.png draws it
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
               rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, mamba_chunk_size=16)
HYBRID_FRACTION = 0.75


def layer_types(n: int, fraction: float) -> list[str]:
    """``fraction`` of ``n`` attention layers replaced by Mamba2, spread evenly (as benchmarks/inference.py)."""
    k = round(fraction * n)
    step = n / k
    mamba = {min(int(step * j + step / 2), n - 1) for j in range(k)}
    return ["mamba2" if i in mamba else "attention" for i in range(n)]


def build(shape: dict, kind: str, device: str, dtype, max_len: int):
    import torch

    from rad_ds.models import RadHybridConfig, RadHybridForCausalLM

    n = shape["num_hidden_layers"]
    types = ["attention"] * n if kind == "base" else layer_types(n, HYBRID_FRACTION)
    cfg = RadHybridConfig(**shape, layer_types=types, max_position_embeddings=max_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = RadHybridForCausalLM(cfg)
    return model.to(dtype).eval()


def fill_state(dec, context: int, seed: int) -> None:
    """Random values in the decoder's state, as if ``context`` tokens had been prefilled (never zeros: they can run
    faster than real data), drawn on the state's device (32k x batch 8 of KV is 6 GB)."""
    import torch

    gen = torch.Generator(device=dec.device).manual_seed(seed)
    for s in dec.states:
        for t in ((s.key, s.value) if hasattr(s, "key") else (s.conv_state, s.ssm_state)):
            t.normal_(0.0, 0.5, generator=gen)
    dec.pos.fill_(context)


def state_bytes(dec) -> int:
    return sum(t.numel() * t.element_size() for s in dec.states
               for t in ((s.key, s.value) if hasattr(s, "key") else (s.conv_state, s.ssm_state)))


def time_decode(model, context: int, batch: int, steps: int, graph: bool, blocks: int = 3) -> dict:
    """Tokens/s of ``steps`` greedy steps (``blocks`` equal blocks, the median block scaled), after the capture."""
    import torch

    from rad_ds.models.static_decode import StaticDecoder

    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    dec = StaticDecoder(model, batch_size=batch, max_len=context + steps + 8, graph=graph)
    fill_state(dec, context, seed=context + batch)
    nxt = torch.randint(10, model.config.vocab_size, (batch,), device=dev)
    t0 = time.perf_counter()
    nxt = dec.step(nxt).argmax(-1)  # captures the graph on CUDA: not timed
    sync()
    capture_s = time.perf_counter() - t0
    per = max(1, steps // blocks)
    times = []
    for _ in range(blocks):
        sync()
        t0 = time.perf_counter()
        for _ in range(per):
            nxt = dec.step(nxt).argmax(-1)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times) / per
    row = {"context": context, "batch": batch, "decoder": "cuda_graph" if dec.graph else "eager",
           "decode_tok_s": batch / step_s, "step_ms": step_s * 1e3, "first_step_s": capture_s,
           "state_bytes": state_bytes(dec)}
    del dec
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def analyse(doc: dict) -> dict:
    """Limits, shares and the hybrid/base ratio per (context, batch, decoder); adds ``figures``."""
    bw = doc["copy_gbs"] * 1e9
    base = {(r["context"], r["batch"], r["decoder"]): r for r in doc["models"]["base"]["rows"]}
    for kind, m in doc["models"].items():
        for r in m["rows"]:
            r["bytes_per_step"] = m["weight_bytes"] + r["state_bytes"]
            r["limit_tok_s"] = r["batch"] * bw / r["bytes_per_step"]
            r["share_of_limit"] = r["decode_tok_s"] / r["limit_tok_s"]
            b = base.get((r["context"], r["batch"], r["decoder"]))
            r["vs_base"] = r["decode_tok_s"] / b["decode_tok_s"] if b else None
            r["bytes_ratio"] = b["bytes_per_step"] / r["bytes_per_step"] if b else None
    hyb = [r for r in doc["models"]["hybrid"]["rows"] if r["decoder"] == doc["decoder"]]
    longest = max(r["context"] for r in hyb)
    doc["figures"] = {
        "hybrid_vs_base": {f"{r['context']}x{r['batch']}": round(r["vs_base"], 3) for r in hyb},
        "hybrid_vs_base_longest": {str(r["batch"]): round(r["vs_base"], 3) for r in hyb if r["context"] == longest},
        "bytes_ratio_longest": {str(r["batch"]): round(r["bytes_ratio"], 3) for r in hyb if r["context"] == longest},
        "share_of_limit": {k: {f"{r['context']}x{r['batch']}": round(r["share_of_limit"], 3) for r in m["rows"]
                               if r["decoder"] == doc["decoder"]} for k, m in doc["models"].items()},
        "copy_gbs": doc["copy_gbs"],
    }
    return doc


def render(doc: dict) -> str:
    """The results markdown, from the JSON alone."""
    lines = [f"# Decode: hybrid vs all-attention base ({doc['device']}, {doc['dtype']}, {doc['decoder']})", "",
             f"{doc['shape_name']}-shaped models, random weights; hybrid: {doc['models']['hybrid']['mamba_layers']} "
             f"of {doc['num_layers']} layers Mamba2. State filled at the context, then {doc['steps']} greedy steps "
             f"(median of 3 blocks). Limit = batch x {doc['copy_gbs']:.0f} GB/s (measured copy) / (weights + state).",
             "", "| model | decoder | context | batch | tokens/s | ms/step | limit tokens/s | share | vs base "
                 "| bytes ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, m in doc["models"].items():
        for r in m["rows"]:
            vs = "-" if r["vs_base"] is None else f"{r['vs_base']:.2f}x"
            br = "-" if r["bytes_ratio"] is None else f"{r['bytes_ratio']:.2f}x"
            lines.append(f"| {kind} | {r['decoder']} | {r['context']} | {r['batch']} | {r['decode_tok_s']:.0f} | "
                         f"{r['step_ms']:.2f} | {r['limit_tok_s']:.0f} | {r['share_of_limit']:.2f} | {vs} | {br} |")
    from rad_ds.core.provenance import provenance_line

    lines += ["", provenance_line(doc["provenance"])]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """decode tokens/s by context, both models, batch 1 and 8, with the bandwidth limits dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for m in doc["models"].values() for r in m["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for (kind, m), color in zip(doc["models"].items(), ("tab:blue", "tab:orange")):
            rows = [r for r in m["rows"] if r["batch"] == b and r["decoder"] == doc["decoder"]]
            x = [r["context"] for r in rows]
            ax.plot(x, [r["decode_tok_s"] for r in rows], "o-", color=color, label=f"{kind}")
            ax.plot(x, [r["limit_tok_s"] for r in rows], "--", color=color, alpha=0.6, label=f"{kind} limit")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {b} ({doc['device']}, {doc['dtype']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--shape", default="smollm2", choices=["smollm2", "toy"])
    ap.add_argument("--contexts", default="4096,16384,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=48, help="timed decode steps per row")
    ap.add_argument("--eager-context", type=int, default=None,
                    help="also decode eagerly (no graph) at this context, batch 1 (default: the first context)")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None, help="PNG of tokens/s by context")
    a = ap.parse_args(argv)
    import torch

    from env_probe import copy_bandwidth_gbs  # this folder is sys.path[0] when run as a script
    from rad_ds.core.provenance import provenance, write_results

    dtype = getattr(torch, a.dtype)
    contexts = [int(c) for c in a.contexts.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    eager_ctx = a.eager_context or contexts[0]
    shape = SMOLLM2 if a.shape == "smollm2" else TOY
    graph = a.device == "cuda"
    doc = {"benchmark": "gpu_check_decode", "provenance": provenance(), "device": a.device, "dtype": a.dtype,
           "torch": torch.__version__, "shape_name": a.shape, "shape": shape, "num_layers": shape["num_hidden_layers"],
           "hybrid_fraction": HYBRID_FRACTION, "decoder": "cuda_graph" if graph else "eager", "steps": a.steps,
           "copy_gbs": copy_bandwidth_gbs(a.device, a.copy_mib), "models": {}}
    print(f"copy bandwidth {doc['copy_gbs']:.0f} GB/s (read + write)", flush=True)
    max_len = max(contexts) + a.steps + 8
    for kind in ("base", "hybrid"):
        model = build(shape, kind, a.device, dtype, max_len)
        rows = []
        for ctx in contexts:
            for b in batches:
                rows.append(time_decode(model, ctx, b, a.steps, graph))
                r = rows[-1]
                print(f"{kind:6s} {r['decoder']:10s} context {ctx:6d} batch {b}: {r['decode_tok_s']:9.1f} tok/s "
                      f"({r['step_ms']:.2f} ms/step, first step {r['first_step_s']:.2f} s)", flush=True)
        if graph:  # what the graph buys: the same step run eagerly, once
            rows.append(time_decode(model, eager_ctx, 1, a.steps, graph=False))
        doc["models"][kind] = {
            "mamba_layers": [i for i, t in enumerate(model.config.layer_types) if t == "mamba2"],
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "rows": rows,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else None}
        del model
    doc = analyse(doc)
    print(write_results(a.out, doc, render).read_text())
    if a.plot:
        plot(doc, Path(a.plot))
    return 0

if __name__ == "__main__":
    sys.exit(main())
