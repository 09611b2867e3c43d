"""The hybrid's payoff at inference: prefill and decode tokens/s, cache bytes and peak memory by context length,
students with a share of the base's attention layers replaced by Mamba2 against **rad-ds' own all-attention model**
(the headline: the same code with and without Mamba2 layers), and both against transformers' own Llama on the same
weights, with its ``StaticCache`` (preallocated KV, the cache transformers recommends for fast decoding) and with its
default ``DynamicCache``; decode as a fraction of what the machine's memory bandwidth allows.

SmolLM2-135M-Instruct (the embedded model), fp32, a random prompt of ``context`` tokens: one prefill forward
with the model's own cache (transformers' StaticCache / DynamicCache, rad-ds' RadHybridCache), then D greedy decode
steps; prefill tokens/s = batch x context / its time, decode tokens/s = batch x D / their time (D steps in 3 blocks,
the median block's rate). Each model runs in a process of its own, whose peak RSS (``ru_maxrss``) is its peak
memory. The students' layers come from a diagnosis report (``--report``, its selection for each k) or, without one,
are spread evenly over the depth. A memory-bandwidth micro-benchmark runs in the same job (a float32 GEMV over a
matrix far larger than the caches, the operation decoding is made of): bytes moved per decoded step = weights + the
caches read (KV of every attention layer at the context, conv + SSM state of every Mamba2 layer), limit tokens/s =
batch x bandwidth / bytes per step.

Batch 8 prefills all 8 rows where ``8 x context <= --batch8-prefill-max`` tokens; above that it prefills one row
and repeats its state 8 times (a decode step costs the same whatever the state holds), so its prefill is not
reported. The students' decode speed-up over the all-attention model is set against the ratio of bytes each moves
per token (the most a bandwidth-bound decode can gain), and the same job times the model's own weight matrices as a
chain of bare GEMVs in layer order: the floor of any eager implementation on this machine.

On CUDA (``--device cuda --dtype bfloat16``) rad-ds' models also decode with ``StaticDecoder``, a CUDA graph of
the whole step (``rad_ds/models/static_decode.py``).

    python benchmarks/inference.py --out benchmarks/results/inference_cpu.json      # the full grid, ~20 min here
    python benchmarks/inference.py --contexts 1024,8192 --batch8-contexts 1024,8192 --batch8-prefill-max 0 \
        --fractions 0.75 --decode-tokens 24                                             # the committed CPU run
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
HF_KINDS = ("hf", "hf_static")  # transformers' Llama with its default DynamicCache / with its StaticCache


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
    if kind in HF_KINDS:
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
        return hf, "transformers Llama, " + ("StaticCache" if kind == "hf_static" else "DynamicCache (default)")
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
        if kind in HF_KINDS:
            from transformers import DynamicCache, StaticCache

            cache = (StaticCache(config=model.config, max_cache_len=prompt.size(1) + steps + 2) if kind == "hf_static"
                     else DynamicCache(config=model.config))
            state = {"cache": cache}  # filled in place
            out = model(prompt, use_cache=True, logits_to_keep=1, **state)
        else:
            from rad_ds.models import RadHybridCache

            state = {"cache": RadHybridCache(model.config)}
            out = model(prompt, use_cache=True, logits_to_keep=1, **state)
        _sync(dev)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        if prompt.size(0) != batch:
            rows = batch // prompt.size(0)
            if kind in HF_KINDS:  # StaticCache's layers have no batch_repeat_interleave: repeat their tensors
                for layer in state["cache"].layers:
                    layer.keys = layer.keys.repeat_interleave(rows, dim=0)
                    layer.values = layer.values.repeat_interleave(rows, dim=0)
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
    decoders = [False, True] if device.startswith("cuda") and kind not in HF_KINDS else [False]
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
    """Per row: the physical limit and its share; the ratio to rad-ds' own all-attention model (the headline: the
    same code with and without Mamba2 layers) and to transformers' Llama with each cache; the bytes ratio (what a
    bandwidth-bound decode can gain over the all-attention model) and the speed-up against it. Adds ``targets``."""
    bw = result["bandwidth_gbs"] * 1e9
    by_kind = {m["kind"]: m for m in result["models"] if m["kind"] != "student"}
    base = by_kind["base"]
    ref = {k: {(r["context"], r["batch"]): r for r in m["rows"] if r["decoder"] == "dynamic"}
           for k, m in by_kind.items()}
    for m in result["models"]:
        for r in m["rows"]:
            key = (r["context"], r["batch"])
            b = ref["base"][key]
            r["bytes_per_token"] = _bytes_per_token(m, r)
            r["limit_tok_s"] = bw / r["bytes_per_token"]
            r["share_of_limit"] = r["decode_tok_s"] / r["limit_tok_s"]
            r["vs_all_attention"] = r["decode_tok_s"] / b["decode_tok_s"]
            for kind, name in (("hf", "vs_transformers"), ("hf_static", "vs_transformers_static")):
                r[name] = r["decode_tok_s"] / ref[kind][key]["decode_tok_s"] if kind in ref else None
            r["bytes_ratio"] = _bytes_per_token(base, b) / r["bytes_per_token"]
            r["speedup_over_bytes_ratio"] = r["vs_all_attention"] / r["bytes_ratio"]
    hybrid = min((m for m in result["models"] if m["kind"] == "student"),
                 key=lambda m: abs(m["fraction"] - TARGET_FRACTION))
    dyn = lambda m: [r for r in m["rows"] if r["decoder"] == "dynamic"]  # noqa: E731
    b1 = lambda m: [r for r in dyn(m) if r["batch"] == 1]  # noqa: E731
    longest = max(r["context"] for r in dyn(hybrid))
    long = [r for r in b1(hybrid) if r["context"] >= 1024]
    long8 = [r for r in dyn(hybrid) if r["context"] >= 1024 and r["batch"] > 1]
    ratios = lambda m, key: [r[key] for r in dyn(m) if r[key] is not None]  # noqa: E731
    result["targets"] = {
        "hybrid": hybrid["model"],
        "hybrid_vs_all_attention": {f"{r['context']}x{r['batch']}": r["vs_all_attention"] for r in dyn(hybrid)},
        "hybrid_vs_all_attention_longest": {str(r["batch"]): r["vs_all_attention"] for r in dyn(hybrid)
                                            if r["context"] == longest},
        "longest_context": longest,
        "all_attention_vs_transformers": [min(ratios(base, "vs_transformers")), max(ratios(base, "vs_transformers"))],
        "all_attention_vs_transformers_static": [min(ratios(base, "vs_transformers_static")),
                                                 max(ratios(base, "vs_transformers_static"))]
        if ratios(base, "vs_transformers_static") else None,
        "hybrid_speedup_over_bytes_ratio_min_from_1024": min(r["speedup_over_bytes_ratio"] for r in long)
        if long else None,
        "hybrid_speedup_over_bytes_ratio_min_from_1024_batch8": min(r["speedup_over_bytes_ratio"] for r in long8)
        if long8 else None,
        "decode_share_of_limit_batch1": {m["model"]: [round(r["share_of_limit"], 3) for r in b1(m)]
                                         for m in result["models"]},
        "gemv_chain_share_of_limit": result.get("gemv_chain_tok_s", 0) * _bytes_per_token(base, b1(base)[0]) / bw
        if result.get("gemv_chain_tok_s") else None,
    }
    return result


DECODERS = {"dynamic": "eager", "static_graph": "CUDA graph"}  # rows' "decoder": a step per call, or a replayed graph


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _headline_table(hybrid: dict, base: dict, t: dict) -> list[str]:
    """The hybrid against rad-ds' own all-attention model, per context and batch (eager decoder)."""
    lines = [f"## {t['hybrid']} vs rad-ds, all attention", "",
             "| context | batch | all attention tok/s | hybrid tok/s | **hybrid / all attention** | bytes ratio | "
             "speed-up / bytes ratio |", "|---:|---:|---:|---:|---:|---:|---:|"]
    base_rows = {(r["context"], r["batch"]): r for r in base["rows"] if r["decoder"] == "dynamic"}
    for r in hybrid["rows"]:
        if r["decoder"] != "dynamic":
            continue
        b = base_rows[(r["context"], r["batch"])]
        lines.append(f"| {r['context']} | {r['batch']} | {b['decode_tok_s']:.2f} | {r['decode_tok_s']:.2f} | "
                     f"**{r['vs_all_attention']:.2f}x** | {r['bytes_ratio']:.2f} | "
                     f"{r['speedup_over_bytes_ratio']:.2f} |")
    return lines


def _models_table(result: dict, bw: float, t: dict) -> list[str]:
    """Every model's rows against the references and the bandwidth limit."""
    lines = ["## Every model", "",
             f"Memory bandwidth (GEMV over 256 MiB): **{bw:.1f} GB/s**. Decode limit = bandwidth / bytes read per "
             "token (weights once per step, shared by the batch, + every row's cache)."]
    if result.get("gemv_chain_tok_s"):
        lines.append(f"The base's weight matrices as bare GEMVs in layer order: **{result['gemv_chain_tok_s']:.1f} "
                     f"steps/s** = {100 * t['gemv_chain_share_of_limit']:.0f}% of the limit at context 0: the ceiling "
                     "of an eager implementation on this machine.")
    lines += ["", "| model | decoder | context | batch | prefill tok/s | decode tok/s | vs all attention | "
              "vs transformers StaticCache | vs transformers DynamicCache | bytes ratio | % of limit | cache MiB | "
              "peak MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in result["models"]:
        peak = m.get("peak_gpu_mib") or m["peak_rss_mib"]
        for r in m["rows"]:
            pre = f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] else "-"
            lines.append(f"| {m['model']} | {DECODERS[r['decoder']]} | {r['context']} | {r['batch']} | {pre} | "
                         f"{r['decode_tok_s']:.2f} | {_x(r['vs_all_attention'])} | "
                         f"{_x(r.get('vs_transformers_static'))} | {_x(r['vs_transformers'])} | "
                         f"{r['bytes_ratio']:.2f} | {100 * r['share_of_limit']:.0f}% | "
                         f"{r['cache_bytes'] / 2**20:.1f} | {peak:.0f} |")
    return lines


def _summary_lines(hybrid: dict, t: dict) -> list[str]:
    """The summary's bullets, from the analysed targets."""
    rng = lambda v: f"{v[0]:.2f}-{v[1]:.2f}x" if v else "-"  # noqa: E731
    return ["## Summary", "",
            f"- {t['hybrid']} / rad-ds all attention at {t['longest_context']} tokens: "
            + ", ".join(f"batch {b}: **{v:.2f}x**" for b, v in t["hybrid_vs_all_attention_longest"].items()) + ".",
            f"- {t['hybrid']} / transformers' Llama with StaticCache at {t['longest_context']} tokens: "
            + ", ".join(f"batch {r['batch']}: {_x(r.get('vs_transformers_static'))}" for r in hybrid["rows"]
                        if r["decoder"] == "dynamic" and r["context"] == t["longest_context"]) + ".",
            f"- rad-ds all attention / transformers' Llama: {rng(t['all_attention_vs_transformers_static'])} with "
            f"StaticCache, {rng(t['all_attention_vs_transformers'])} with the default DynamicCache.",
            (f"- {t['hybrid']}: speed-up over all attention / bytes ratio, contexts >= 1024, batch 1: min "
             f"**{t['hybrid_speedup_over_bytes_ratio_min_from_1024']:.2f}**"
             + (f"; batch 8: min {t['hybrid_speedup_over_bytes_ratio_min_from_1024_batch8']:.2f}."
                if t["hybrid_speedup_over_bytes_ratio_min_from_1024_batch8"] is not None else "."))
            if t["hybrid_speedup_over_bytes_ratio_min_from_1024"] is not None else "",
            "- Decode at batch 1 as a share of the bandwidth limit: " + "; ".join(
                f"{k}: {min(v) * 100:.0f}-{max(v) * 100:.0f}%" for k, v in t["decode_share_of_limit_batch1"].items())
            + (f". The bare GEMV chain of the same weights reaches {100 * t['gemv_chain_share_of_limit']:.0f}%."
               if t["gemv_chain_share_of_limit"] else ".")]


def render(result: dict) -> str:
    """The results markdown, from the (analysed) JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    bw, t = result["bandwidth_gbs"], result["targets"]
    dev = result.get("device", "cpu")
    dtype = result.get("dtype", "float32")
    hybrid = next(m for m in result["models"] if m["model"] == t["hybrid"])
    base = next(m for m in result["models"] if m["kind"] == "base")
    lines = [f"# Inference on {dev} ({result['threads']} threads, {dtype}, SmolLM2-135M-Instruct weights)", "",
             f"Decode tokens/s, the median of 3 blocks of {result['decode_tokens'] // 3} steps after a prefill of "
             "`context` tokens; students replace that share of the attention layers with Mamba2 (untrained: speed "
             "does not depend on the weights). **Headline: the hybrid against rad-ds' own all-attention model** (the "
             "same code with and without Mamba2 layers); transformers' Llama on the same weights with its "
             "StaticCache and its default DynamicCache are the references a user would otherwise run.", ""]
    lines += _headline_table(hybrid, base, t)
    lines += ["", *_models_table(result, bw, t)]
    lines += ["", *_summary_lines(hybrid, t),
              "", f"{result['seconds']:.0f} s in all. Chart: `{result['chart']}`.", "",
              provenance_line(result["provenance"])]
    return "\n".join(lines) + "\n"


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
    from rad_ds.core.provenance import RENDER_HELP, provenance, render_only, write_results

    default_out = ROOT / "benchmarks" / "results" / "inference_cpu.json"
    if render_only(render, default_out):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192")
    ap.add_argument("--batch8-contexts", default="512,1024,2048,4096,8192", help="contexts also run at batch 8")
    ap.add_argument("--batch8-prefill-max", type=int, default=8192,
                    help="largest 8 x context prefilled as a real batch (above: one row, state repeated)")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                    help="shares of the attention layers the students replace")
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--report", default=None, help="diagnosis report.json for the students' layers")
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    b8 = {int(c) for c in a.batch8_contexts.split(",") if c}
    batches = {c: [1, 8] if c in b8 else [1] for c in contexts}
    kinds = [("hf_static", 0.0), ("hf", 0.0), ("base", 0.0)] + [("student", float(f)) for f in a.fractions.split(",")]
    models = []
    t0 = time.time()
    for kind, frac in kinds:
        models.append(_child([kind, frac, contexts, batches, a.decode_tokens, a.threads, a.report, a.device,
                              a.dtype, a.batch8_prefill_max]))
        print(f"{models[-1]['model']}: done ({time.time() - t0:.0f} s)", flush=True)
    cpu = a.device == "cpu"
    out = Path(a.out)
    result = {"benchmark": "inference", "provenance": provenance(), "device": a.device, "dtype": a.dtype,
              "threads": a.threads,
              "bandwidth_gbs": bandwidth_gbs(a.threads) if cpu else _gpu_bandwidth_gbs(a.device),
              "gemv_chain_tok_s": gemv_chain_tok_s(a.threads) if cpu else None,
              "decode_tokens": a.decode_tokens, "models": models,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "seconds": time.time() - t0, "chart": out.with_suffix(".png").name}
    analyse(result)
    print(write_results(out, result, render).read_text())
    chart(result, out.with_suffix(".png"))


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
