"""The hybrid's payoff at inference: prefill and decode tokens/s, cache bytes and peak memory by context length,
the base against students with 25/50/75/90% of its attention replaced, rad-ds' class against transformers' own
Llama on the same weights, and decode as a fraction of what the machine's memory bandwidth allows.

SmolLM2-135M-Instruct (the embedded model), fp32, a random prompt of ``context`` tokens: one prefill forward
with the model's own cache (transformers' DynamicCache, rad-ds' RadHybridCache), then D greedy decode steps;
prefill tokens/s = batch x context / its time, decode tokens/s = batch x D / their time (D steps in 3 blocks, the
median block's rate). Each model runs in a
process of its own, whose peak RSS (``ru_maxrss``) is its peak memory. The students' layers come from a
diagnosis report (``--report``, its selection for each k) or, without one, are spread evenly over the depth. A
memory-bandwidth micro-benchmark runs in the same job (a float32 GEMV over a matrix far larger than the
caches, the operation decoding is made of): bytes moved per decoded step = weights + the caches read (KV of
every attention layer at the context, conv + SSM state of every Mamba2 layer), limit tokens/s = batch x
bandwidth / bytes per step.

Batch 8 prefills all 8 rows where ``8 x context <= --batch8-prefill-max`` tokens; above that it prefills one row
and repeats its state 8 times (a decode step costs the same whatever the state holds), so its prefill is not
reported. The students' decode speed-up over transformers' Llama is set against the ratio of bytes each moves per
token (the most a bandwidth-bound decode can gain), and the same job times the model's own weight matrices as a
chain of bare GEMVs in layer order: the floor of any eager implementation on this machine.

On CUDA (``--device cuda --dtype bfloat16``) rad-ds' models also decode with ``StaticDecoder``, a CUDA graph of
the whole step (``rad_ds/models/static_decode.py``); transformers' Llama keeps its default dynamic cache.

    python benchmarks/inference.py --out benchmarks/results/inference_cpu.json
    python benchmarks/inference.py --device cuda --dtype bfloat16 --contexts 1024,4096,16384,32768 \
        --out benchmarks/results/gpu/inference_cuda_bf16.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FRACTIONS = (0.25, 0.5, 0.75, 0.9)


def bandwidth_gbs(threads: int, mib: int = 256) -> float:
    """Bytes per second a GEMV streams through a float32 matrix of ``mib`` MiB (median of 9 after a warm-up)."""
    import torch

    torch.set_num_threads(threads)
    n = 4096
    w = torch.randn(mib * 2**20 // (4 * n), n)
    x = torch.randn(n)
    times = []
    for i in range(10):
        t0 = time.perf_counter()
        w.mv(x)
        if i:
            times.append(time.perf_counter() - t0)
    return w.numel() * 4 / statistics.median(times) / 1e9


def gemv_chain_tok_s(threads: int) -> float:
    """Tokens/s of the base model's weight matrices run as bare GEMVs in layer order (one token, no cache, no
    other op): what the decode step's matrix reads alone cost here, the floor of any eager implementation."""
    import torch
    import torch.nn.functional as F

    from rad_ds.models.conversion import load_model

    torch.set_num_threads(threads)
    model, _ = load_model("embedded:smollm2", dtype=torch.float32)
    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.size(1): torch.randn(1, w.size(1)) for w in mats}
    times = []
    with torch.no_grad():
        for i in range(12):
            t0 = time.perf_counter()
            for w in mats:
                F.linear(x[w.size(1)], w)
            if i > 1:
                times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def student_layers(config, fraction: float, report: str | None) -> list[int]:
    attn = [i for i, t in enumerate(config.layer_types) if t == "attention"]
    k = round(fraction * len(attn))
    if report:
        from rad_ds.surgery import layers_from_report

        return layers_from_report(report, k, config)[0]
    step = len(attn) / k
    return sorted({attn[min(int(step * j + step / 2), len(attn) - 1)] for j in range(k)})


def build(kind: str, fraction: float, report: str | None, device: str = "cpu", dtype: str = "float32"):
    """(model, description) of ``kind``: hf (transformers' Llama), base (rad-ds, all attention), student."""
    model, what = _build_fp32(kind, fraction, report)
    import torch

    return model.to(device, getattr(torch, dtype)), what


def _build_fp32(kind: str, fraction: float, report: str | None):
    import torch

    from rad_ds.models.conversion import load_model

    model, _ = load_model("embedded:smollm2", dtype=torch.float32)
    if kind == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        c = model.config
        cfg = LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
            rope_parameters=dict(c.rope_parameters), max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
        with torch.device("meta"):
            hf = LlamaForCausalLM(cfg)
        hf.load_state_dict(model.state_dict(), strict=False, assign=True)  # the same tensors: one copy
        hf.tie_weights()
        hf.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # a non-persistent buffer: made on the CPU
        ids = torch.arange(10, 42)[None]
        with torch.no_grad():  # the same model: the comparison is of implementations only
            torch.testing.assert_close(hf.eval()(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)
        return hf, "transformers LlamaForCausalLM"
    if kind == "student":
        from rad_ds.surgery import replace_attention

        layers = student_layers(model.config, fraction, report)
        replace_attention(model, layers)
        return model.eval(), f"rad-ds, {len(layers)}/{model.config.num_hidden_layers} Mamba2"
    return model.eval(), "rad-ds, all attention"


def cache_bytes(config, context: int, batch: int, elem: int = 4) -> int:
    """Bytes of the decoding state at ``context`` tokens: KV of attention layers (``elem`` bytes per value),
    conv (``elem``) + SSM state (float32) of Mamba2 layers."""
    types = list(getattr(config, "layer_types", None) or ["attention"] * config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_key_value_heads * head_dim * context * elem
    mamba = 0
    if "mamba2" in types:
        mamba = (3 * config.mamba_d_inner * (config.mamba_d_conv - 1) * elem
                 + config.mamba_d_inner * config.mamba_d_state * 4)
    return batch * sum(kv if t == "attention" else mamba for t in types)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _prefill_and_steps(model, prompt, steps: int, kind: str, batch: int, static: bool = False):
    """(prefill seconds, decode seconds for ``steps`` greedy tokens at ``batch`` rows) with the model's own
    cache. A prompt of fewer rows than ``batch`` is prefilled and its state repeated to ``batch`` rows."""
    import torch

    dev = prompt.device
    with torch.no_grad():
        if static:
            from rad_ds.models.static_decode import StaticDecoder

            dec = StaticDecoder(model, batch_size=batch, max_len=prompt.size(1) + steps + 1)
            _sync(dev)
            t0 = time.perf_counter()
            logits = dec.prefill(prompt.expand(batch, -1) if prompt.size(0) != batch else prompt)
            _sync(dev)
            t1 = time.perf_counter()
            nxt = logits.argmax(-1)
            nxt = dec.step(nxt).argmax(-1)  # the first step captures the graph: not timed
            return t1 - t0, _median_block(lambda t: dec.step(t).argmax(-1), nxt, steps, dev)
        _sync(dev)
        t0 = time.perf_counter()
        if kind == "hf":
            from transformers import DynamicCache

            out = model(prompt, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
            state = {"past_key_values": out.past_key_values}
        else:
            from rad_ds.models import RadHybridCache

            state = {"cache": RadHybridCache(model.config)}
            out = model(prompt, use_cache=True, logits_to_keep=1, **state)
        _sync(dev)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        if prompt.size(0) != batch:
            rows = batch // prompt.size(0)
            if kind == "hf":
                state["past_key_values"].batch_repeat_interleave(rows)
            else:
                state["cache"].reorder_cache(torch.arange(prompt.size(0), device=dev).repeat_interleave(rows))
            nxt = nxt.repeat_interleave(rows, dim=0)
            _sync(dev)
            t1 = time.perf_counter()
        step = lambda t: model(t, use_cache=True, **state).logits[:, -1:].argmax(-1)  # noqa: E731
        return t1 - t0, _median_block(step, nxt, steps, dev)


BLOCKS = 3  # decode time = the median of this many equal blocks of steps, scaled to all of them


def _median_block(step, nxt, steps: int, dev) -> float:
    """Seconds for ``steps`` decode steps, as ``BLOCKS`` x the median block of ``steps // BLOCKS`` (robust to a
    hiccup of a shared machine)."""
    n = max(1, steps // BLOCKS)
    times = []
    for _ in range(BLOCKS):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            nxt = step(nxt)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * steps / n


def time_model(kind: str, fraction: float, contexts: list[int], batches: dict, decode: int, threads: int,
               report: str | None, device: str = "cpu", dtype: str = "float32", prefill_max: int = 8192) -> dict:
    """One model's rows (runs in its own process): prefill forward, then ``decode`` greedy steps; on CUDA also
    rad-ds' static CUDA-graph decoder."""
    import torch

    torch.set_num_threads(threads)
    model, what = build(kind, fraction, report, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    g = torch.Generator().manual_seed(0)
    decoders = [False, True] if device.startswith("cuda") and kind != "hf" else [False]
    warm = torch.randint(10, 1000, (1, 64), generator=g).to(device)
    for static in decoders:
        _prefill_and_steps(model, warm, 4, kind, 1, static)  # warm-up
    rows = []
    for ctx in contexts:
        for batch in batches.get(ctx, [1]):
            rows_in = batch if batch * ctx <= prefill_max else 1
            prompt = torch.randint(10, model.config.vocab_size, (rows_in, ctx), generator=g).to(device)
            for static in decoders:
                t_pre, t_dec = _prefill_and_steps(model, prompt, decode, kind, batch, static)
                rows.append({"context": ctx, "batch": batch, "decoder": "static_graph" if static else "dynamic",
                             "prefill_tok_s": rows_in * ctx / t_pre if rows_in == batch else None,
                             "decode_tok_s": batch * decode / t_dec,
                             "cache_bytes": cache_bytes(model.config, ctx, batch, elem)})
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    layers = sorted(getattr(model.config, "mamba_layers", None) or [])
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"kind": kind, "fraction": fraction, "model": what, "mamba_layers": layers, "weight_bytes": weights,
            "rows": rows, "peak_gpu_mib": peak_gpu}


def _child(args: list[str]) -> dict:
    """Run ``time_model`` in a fresh process; its result and peak RSS."""
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(p.pid, 0)
    out = p.stdout.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"benchmark child {args[:2]} failed:\n{out[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mib"] = usage.ru_maxrss / 1024
    return res


TARGET_FRACTION = 0.75  # the hybrid: its speed-up against its bytes ratio


def _bytes_per_token(model: dict, row: dict) -> float:
    """Bytes a decode step reads per generated token: the weights once per step, shared by the batch, plus every
    row's cache."""
    return (model["weight_bytes"] + row["cache_bytes"]) / row["batch"]


def analyse(result: dict) -> dict:
    """Per row: the physical limit and its share, the ratio to transformers, and for students the speed-up over
    transformers against the ratio of bytes moved per token. Adds ``targets`` to ``result``."""
    bw = result["bandwidth_gbs"] * 1e9
    hf_model = result["models"][0]
    hf = {(r["context"], r["batch"]): r for r in hf_model["rows"]}
    for m in result["models"]:
        for r in m["rows"]:
            ref = hf[(r["context"], r["batch"])]
            r["bytes_per_token"] = _bytes_per_token(m, r)
            r["limit_tok_s"] = bw / r["bytes_per_token"]
            r["share_of_limit"] = r["decode_tok_s"] / r["limit_tok_s"]
            r["vs_transformers"] = r["decode_tok_s"] / ref["decode_tok_s"]
            r["bytes_ratio"] = _bytes_per_token(hf_model, ref) / r["bytes_per_token"]
            r["speedup_over_bytes_ratio"] = r["vs_transformers"] / r["bytes_ratio"]
    base = next(m for m in result["models"] if m["kind"] == "base")
    hybrid = min((m for m in result["models"] if m["kind"] == "student"),
                 key=lambda m: abs(m["fraction"] - TARGET_FRACTION))
    dyn = lambda m: [r for r in m["rows"] if r["decoder"] == "dynamic"]  # noqa: E731
    b1 = lambda m: [r for r in dyn(m) if r["batch"] == 1]  # noqa: E731
    long = [r for r in b1(hybrid) if 1024 <= r["context"] <= 8192]
    long8 = [r for r in dyn(hybrid) if 1024 <= r["context"] <= 8192 and r["batch"] > 1]
    result["targets"] = {
        "all_attention_vs_transformers_min": min(r["vs_transformers"] for r in dyn(base)),
        "hybrid": hybrid["model"],
        "hybrid_speedup_over_bytes_ratio_min_1024_8192": min(r["speedup_over_bytes_ratio"] for r in long)
        if long else None,
        "hybrid_speedup_over_bytes_ratio_min_1024_8192_batch8": min(r["speedup_over_bytes_ratio"] for r in long8)
        if long8 else None,
        "decode_share_of_limit_batch1": {m["model"]: [round(r["share_of_limit"], 3) for r in b1(m)]
                                         for m in result["models"]},
        "gemv_chain_share_of_limit": result.get("gemv_chain_tok_s", 0) * _bytes_per_token(base, b1(base)[0]) / bw
        if result.get("gemv_chain_tok_s") else None,
    }
    return result


def render(result: dict, out: Path) -> None:
    analyse(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    bw, t = result["bandwidth_gbs"], result["targets"]
    dev = result.get("device", "cpu")
    dtype = result.get("dtype", "float32")
    lines = [f"# Inference on {dev} ({result['threads']} threads, {dtype}, SmolLM2-135M-Instruct weights)", "",
             f"Memory bandwidth (GEMV over 256 MiB): **{bw:.1f} GB/s**. Decode limit = bandwidth / bytes read per "
             "token (weights once per step, shared by the batch, + every row's cache).",
             ""]
    if result.get("gemv_chain_tok_s"):
        lines.append(f"The base's weight matrices as bare GEMVs in layer order: **{result['gemv_chain_tok_s']:.1f} "
                     f"steps/s** = {100 * t['gemv_chain_share_of_limit']:.0f}% of the limit at context 0: the ceiling "
                     "of an eager implementation on this machine.")
        lines.append("")
    lines += ["| model | decoder | context | batch | prefill tok/s | decode tok/s | vs transformers | bytes ratio | "
              "speed-up / bytes ratio | % of limit | cache MiB | peak MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in result["models"]:
        peak = m.get("peak_gpu_mib") or m["peak_rss_mib"]
        for r in m["rows"]:
            pre = f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] else "-"
            lines.append(f"| {m['model']} | {r['decoder']} | {r['context']} | {r['batch']} | {pre} | "
                         f"{r['decode_tok_s']:.2f} | {r['vs_transformers']:.2f}x | {r['bytes_ratio']:.2f} | "
                         f"{r['speedup_over_bytes_ratio']:.2f} | {100 * r['share_of_limit']:.0f}% | "
                         f"{r['cache_bytes'] / 2**20:.1f} | {peak:.0f} |")
    lines += ["", "## Targets", "",
              f"- rad-ds all attention vs transformers' Llama, decode, every row: min "
              f"**{t['all_attention_vs_transformers_min']:.2f}x** (target >= 0.95x).",
              f"- {t['hybrid']}: decode speed-up over transformers / bytes ratio, contexts 1024-8192, batch 1: min "
              f"**{t['hybrid_speedup_over_bytes_ratio_min_1024_8192']:.2f}** (target >= 0.9)"
              + (f"; batch 8: min {t['hybrid_speedup_over_bytes_ratio_min_1024_8192_batch8']:.2f}."
                 if t["hybrid_speedup_over_bytes_ratio_min_1024_8192_batch8"] is not None else ".")
              if t["hybrid_speedup_over_bytes_ratio_min_1024_8192"] is not None else "",
              "- Decode at batch 1 as a share of the bandwidth limit (target >= 70%): " + "; ".join(
                  f"{k}: {min(v) * 100:.0f}-{max(v) * 100:.0f}%" for k, v in t["decode_share_of_limit_batch1"].items())
              + (f". The bare GEMV chain of the same weights reaches {100 * t['gemv_chain_share_of_limit']:.0f}%."
                 if t["gemv_chain_share_of_limit"] else ""),
              "", f"Chart: `{out.with_suffix('.png').name}`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    chart(result, out.with_suffix(".png"))
    print("\n".join(lines))


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for m in result["models"] for r in m["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for m in result["models"]:
            for decoder in ("dynamic", "static_graph"):
                rows = [r for r in m["rows"] if r["batch"] == batch and r["decoder"] == decoder]
                if rows:
                    label = m["model"] + (" (CUDA graph)" if decoder == "static_graph" else "")
                    ax.plot([r["context"] for r in rows], [r["decode_tok_s"] for r in rows], marker="o",
                            linestyle="-" if decoder == "dynamic" else "--", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Decode throughput by context, {result.get('device', 'cpu')} {result.get('dtype', 'float32')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        kind, fraction, contexts, batches, decode, threads, report, device, dtype, pmax = json.loads(sys.argv[2])
        print(json.dumps(time_model(kind, fraction, contexts, {int(k): v for k, v in batches.items()}, decode,
                                    threads, report, device, dtype, pmax)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192")
    ap.add_argument("--batch8-contexts", default="512,1024,2048,4096,8192", help="contexts also run at batch 8")
    ap.add_argument("--batch8-prefill-max", type=int, default=8192,
                    help="largest 8 x context prefilled as a real batch (above: one row, state repeated)")
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--report", default=None, help="diagnosis report.json for the students' layers")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inference_cpu.json"))
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    b8 = {int(c) for c in a.batch8_contexts.split(",") if c}
    batches = {c: [1, 8] if c in b8 else [1] for c in contexts}
    kinds = [("hf", 0.0), ("base", 0.0)] + [("student", f) for f in FRACTIONS]
    models = []
    t0 = time.time()
    for kind, frac in kinds:
        models.append(_child([kind, frac, contexts, batches, a.decode_tokens, a.threads, a.report, a.device,
                              a.dtype, a.batch8_prefill_max]))
        print(f"{models[-1]['model']}: done ({time.time() - t0:.0f} s)", flush=True)
    cpu = a.device == "cpu"
    result = {"benchmark": "inference", "device": a.device, "dtype": a.dtype, "threads": a.threads,
              "bandwidth_gbs": bandwidth_gbs(a.threads) if cpu else _gpu_bandwidth_gbs(a.device),
              "gemv_chain_tok_s": gemv_chain_tok_s(a.threads) if cpu else None,
              "decode_tokens": a.decode_tokens, "models": models,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "seconds": time.time() - t0}
    render(result, Path(a.out))


def _gpu_bandwidth_gbs(device: str, mib: int = 1024) -> float:
    """Device memory bandwidth: a copy of ``mib`` MiB reads and writes it once (median of 20)."""
    import torch

    a = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for i in range(21):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        if i:
            times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() / statistics.median(times) / 1e9


if __name__ == "__main__":
    main()
