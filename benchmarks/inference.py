"""The hybrid's payoff at inference: prefill and decode tokens/s, cache bytes and peak memory by context length,
the base against students with 25/50/75/90% of its attention replaced, rad-ds' class against transformers' own
Llama on the same weights, and decode as a fraction of what the machine's memory bandwidth allows.

SmolLM2-135M-Instruct (the embedded model), fp32, a random prompt of ``context`` tokens: one prefill forward
with the model's own cache (transformers' DynamicCache, rad-ds' RadHybridCache), then D greedy decode steps;
prefill tokens/s = batch x context / its time, decode tokens/s = batch x D / their time. Each model runs in a
process of its own, whose peak RSS (``ru_maxrss``) is its peak memory. The students' layers come from a
diagnosis report (``--report``, its selection for each k) or, without one, are spread evenly over the depth. A
memory-bandwidth micro-benchmark runs in the same job (a float32 GEMV over a matrix far larger than the
caches, the operation decoding is made of): bytes moved per decoded step = weights + the caches read (KV of
every attention layer at the context, conv + SSM state of every Mamba2 layer), limit tokens/s = batch x
bandwidth / bytes per step.

    python benchmarks/inference.py --out benchmarks/results/inference_cpu.json
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


def student_layers(config, fraction: float, report: str | None) -> list[int]:
    attn = [i for i, t in enumerate(config.layer_types) if t == "attention"]
    k = round(fraction * len(attn))
    if report:
        from rad_ds.surgery import layers_from_report

        return layers_from_report(report, k, config)[0]
    step = len(attn) / k
    return sorted({attn[min(int(step * j + step / 2), len(attn) - 1)] for j in range(k)})


def build(kind: str, fraction: float, report: str | None):
    """(model, description) of ``kind``: hf (transformers' Llama), base (rad-ds, all attention), student."""
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


def cache_bytes(config, context: int, batch: int) -> int:
    """Bytes of the decoding state at ``context`` tokens: KV of attention layers, conv + SSM state of Mamba2."""
    types = list(getattr(config, "layer_types", None) or ["attention"] * config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_key_value_heads * head_dim * context * 4
    mamba = 0
    if "mamba2" in types:
        mamba = (3 * config.mamba_d_inner * (config.mamba_d_conv - 1) * 4
                 + config.mamba_d_inner * config.mamba_d_state * 4)
    return batch * sum(kv if t == "attention" else mamba for t in types)


def _prefill_and_steps(model, prompt, steps: int, hf: bool):
    """(prefill seconds, decode seconds for ``steps`` greedy tokens) with the model's own cache."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        if hf:
            from transformers import DynamicCache

            out = model(prompt, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
            state = {"past_key_values": out.past_key_values}
        else:
            from rad_ds.models import RadHybridCache

            state = {"cache": RadHybridCache(model.config)}
            out = model(prompt, use_cache=True, logits_to_keep=1, **state)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(nxt, use_cache=True, **state)
            nxt = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def time_model(kind: str, fraction: float, contexts: list[int], batches: dict, decode: int, threads: int,
               report: str | None) -> dict:
    """One model's rows (runs in its own process): prefill forward, then ``decode`` greedy steps."""
    import torch

    torch.set_num_threads(threads)
    model, what = build(kind, fraction, report)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    _prefill_and_steps(model, torch.randint(10, 1000, (1, 64), generator=g), 4, kind == "hf")  # warm-up
    rows = []
    for ctx in contexts:
        for batch in batches.get(ctx, [1]):
            prompt = torch.randint(10, model.config.vocab_size, (batch, ctx), generator=g)
            t_pre, t_dec = _prefill_and_steps(model, prompt, decode, kind == "hf")
            rows.append({"context": ctx, "batch": batch, "prefill_tok_s": batch * ctx / t_pre,
                         "decode_tok_s": batch * decode / t_dec, "cache_bytes": cache_bytes(model.config, ctx, batch)})
    layers = sorted(getattr(model.config, "mamba_layers", None) or [])
    return {"kind": kind, "fraction": fraction, "model": what, "mamba_layers": layers, "weight_bytes": weights,
            "rows": rows}


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


def render(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    bw = result["bandwidth_gbs"]
    hf = {(r["context"], r["batch"]): r for r in result["models"][0]["rows"]}
    lines = [f"# Inference on this CPU ({result['threads']} threads, fp32, SmolLM2-135M-Instruct weights)", "",
             f"Memory bandwidth (GEMV): {bw:.1f} GB/s. Decode limit = batch x bandwidth / (weights + caches read).",
             "", "| model | context | batch | prefill tok/s | decode tok/s | vs transformers | % of limit | "
             "cache MiB | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in result["models"]:
        for r in m["rows"]:
            limit = r["batch"] * bw * 1e9 / (m["weight_bytes"] + r["cache_bytes"])
            ref = hf[(r["context"], r["batch"])]["decode_tok_s"]
            share = 100 * r["decode_tok_s"] / limit
            lines.append(f"| {m['model']} | {r['context']} | {r['batch']} | {r['prefill_tok_s']:.0f} | "
                         f"{r['decode_tok_s']:.2f} | {r['decode_tok_s'] / ref:.2f}x | {share:.0f}% "
                         f"| {r['cache_bytes'] / 2**20:.1f} | {m['peak_rss_mib']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        kind, fraction, contexts, batches, decode, threads, report = json.loads(sys.argv[2])
        print(json.dumps(time_model(kind, fraction, contexts, {int(k): v for k, v in batches.items()}, decode,
                                    threads, report)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,1024,2048,4096")
    ap.add_argument("--batch8-contexts", default="512,1024", help="contexts also run at batch 8")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--report", default=None, help="diagnosis report.json for the students' layers")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inference_cpu.json"))
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    b8 = {int(c) for c in a.batch8_contexts.split(",") if c}
    batches = {c: [1, 8] if c in b8 else [1] for c in contexts}
    kinds = [("hf", 0.0), ("base", 0.0)] + [("student", f) for f in FRACTIONS]
    models = []
    for kind, frac in kinds:
        models.append(_child([kind, frac, contexts, batches, a.decode_tokens, a.threads, a.report]))
        print(f"{models[-1]['model']}: done", flush=True)
    result = {"benchmark": "inference", "threads": a.threads, "bandwidth_gbs": bandwidth_gbs(a.threads),
              "decode_tokens": a.decode_tokens, "models": models,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    render(result, Path(a.out))


if __name__ == "__main__":
    main()
