"""Peak memory and time of the logit losses' forward + backward: the chunked autograd functions of
``rad_ds.distill.losses`` (the log-softmax recomputed chunk by chunk in backward) vs the plain autograd
path (``kd_loss_sum_ref`` / ``ce_loss_sum_ref``: the same chunks, but autograd keeps every chunk's float32
log-softmax until backward), at a Llama-3 vocabulary.

Each measurement runs in a fresh subprocess: the inputs (student logits float32 requiring grad, teacher
logits float32, every position selected) are allocated, the resident set size is read
(``/proc/self/statm``), then forward + backward run ``--repeats`` times; memory is the process's peak RSS
(``resource.getrusage(...).ru_maxrss``) minus that baseline, so it counts everything the loss adds,
including the logits' gradient (``tokens x vocab`` floats, which backward must produce whatever the loss).
The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every large tensor on its own
and returns it on free: RSS then follows the live tensors.

    python benchmarks/kd_memory.py --out benchmarks/results/kd_memory_cpu.json

``--fused`` rows (issue 24) start one step earlier, from the two models' final hidden states (``--hidden``
wide) and frozen float32 LM heads at that vocabulary, as the trainer does: *plain* projects both to logits
and runs ``kd_loss_sum_ref``, *chunked* projects and runs ``kd_loss_sum``, *fused* runs
``rad_ds.distill.fused.fused_loss_sums`` (no tokens x vocab tensor). Their peak counts the logits too:

    python benchmarks/kd_memory.py --pairs "" --solo "" --out benchmarks/results/kd_memory_fused_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


HEAD_VARIANTS = ("plain", "chunked", "fused")  # the --fused rows: from hidden states through the LM head


def _student_teacher(a, width: int):
    """(shape, generator, student tensor with grad, teacher tensor): ``a.tokens`` in rows of <= 2048 by ``width``,
    drawn from one seeded generator that the caller keeps drawing from."""
    import torch

    torch.set_num_threads(a.threads)
    b = max(a.tokens // 2048, 1)
    shape = (b, a.tokens // b, width)
    g = torch.Generator().manual_seed(0)
    return shape, g, torch.randn(shape, generator=g).requires_grad_(), torch.randn(shape, generator=g)


def head_child(a) -> dict:
    """One ``--fused`` variant in this (fresh) process: hidden states + frozen heads -> KD loss, fwd + bwd."""
    import torch
    import torch.nn.functional as F

    from rad_ds.distill import losses
    from rad_ds.distill.fused import fused_loss_sums

    shape, g, s_h, t_h = _student_teacher(a, a.hidden)
    s_w = torch.randn(a.vocab, a.hidden, generator=g) * a.hidden**-0.5
    t_w = torch.randn(a.vocab, a.hidden, generator=g) * a.hidden**-0.5
    mask = torch.ones(shape[:2], dtype=torch.bool)
    variant = a.variant.removeprefix("head_")

    def run():
        if variant == "fused":
            return fused_loss_sums(s_h, s_w, t_h, t_w, mask, None, a.loss, a.temperature, 0.5, a.chunk)["kd"]
        with torch.no_grad():
            t_logits = F.linear(t_h, t_w)
        fn = losses.kd_loss_sum if variant == "chunked" else losses.kd_loss_sum_ref
        return fn(F.linear(s_h, s_w), t_logits, mask, a.loss, a.temperature, 0.5, a.chunk)

    base = _rss()
    times = []
    for _ in range(a.repeats):
        s_h.grad = None
        t0 = time.perf_counter()
        loss = run()
        loss.backward()
        times.append(time.perf_counter() - t0)
        value = float(loss)
        del loss
    return {"loss": a.loss, "variant": variant, "tokens": a.tokens, "vocab": a.vocab, "hidden": a.hidden,
            "chunk_tokens": a.chunk, "temperature": a.temperature, "logits_gib": a.tokens * a.vocab * 4 / GIB,
            "inputs_gib": (2 * s_h.numel() + 2 * s_w.numel()) * 4 / GIB, "peak_gib": (_peak() - base) / GIB,
            "time_s": statistics.median(times), "times_s": times, "value": value}


def child(a) -> dict:
    """One variant in this (fresh) process; prints its JSON row."""
    import torch

    from rad_ds.distill import losses

    if a.variant.startswith("head_"):
        return head_child(a)
    shape, g, s, t = _student_teacher(a, a.vocab)
    ids = torch.randint(0, a.vocab, shape[:2], generator=g)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    if a.loss == "ce":
        fn = losses.ce_loss_sum if a.variant == "chunked" else losses.ce_loss_sum_ref
        run = lambda: fn(s, ids, mask, a.chunk)
    else:
        fn = losses.kd_loss_sum if a.variant == "chunked" else losses.kd_loss_sum_ref
        run = lambda: fn(s, t, mask, a.loss, a.temperature, 0.5, a.chunk)
    base = _rss()
    before = _peak() - base
    times, held = [], None
    for i in range(a.repeats):
        s.grad = None
        t0 = time.perf_counter()
        loss = run()
        if i == 0:
            held = _rss() - base  # what survives the forward, until backward
        loss.backward()
        times.append(time.perf_counter() - t0)
        value = float(loss)
        del loss
    return {"loss": a.loss, "variant": a.variant, "tokens": a.tokens, "vocab": a.vocab, "chunk_tokens": a.chunk,
            "temperature": a.temperature, "inputs_gib": 2 * s.numel() * 4 / GIB, "grad_gib": s.numel() * 4 / GIB,
            "peak_gib": (_peak() - base) / GIB, "held_after_forward_gib": held / GIB,
            "peak_before_run_gib": before / GIB, "time_s": statistics.median(times), "times_s": times,
            "value": value}


def measure(a, variant: str, loss: str, tokens: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--loss", loss, "--tokens", str(tokens),
           "--vocab", str(a.vocab), "--chunk", str(chunk), "--temperature", str(a.temperature),
           "--repeats", str(a.repeats), "--threads", str(a.threads), "--hidden", str(a.hidden)]
    # a fixed glibc mmap threshold: every tensor above 64 KiB is its own mapping, unmapped on free (by default
    # the threshold grows to the size of freed blocks up to 32 MiB, and chunk buffers below that would stay
    # in the heap and inflate RSS after they are freed)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(f"{loss:>10} {variant:>8} {tokens:>6} tok, chunk {chunk:>5}: peak {row['peak_gib']:.2f} GiB, held after "
          f"forward {row.get('held_after_forward_gib', float('nan')):.2f} GiB, {row['time_s']:.2f} s", flush=True)
    return row


def _specs(text: str, chunk: int):
    """``loss:tokens[:chunk],...`` -> [(loss, tokens, chunk)]."""
    out = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        out.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else chunk))
    return out


def _parser() -> argparse.ArgumentParser:
    from rad_ds.core.provenance import RENDER_HELP

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunk", type=int, default=1024, help="chunk_tokens where a spec gives none (the config default)")
    ap.add_argument("--pairs", default="forward_kl:4096,reverse_kl:4096,jsd:2048,ce:4096",
                    help="loss:tokens[:chunk] measured both ways (jsd at 2048: its autograd path needs ~20 GiB "
                    "at 4096)")
    ap.add_argument("--solo", default="forward_kl:4096:256,forward_kl:8192",
                    help="loss:tokens[:chunk] measured for the chunked path only (the autograd path would not fit)")
    ap.add_argument("--fused", default="forward_kl:4096,forward_kl:8192",
                    help="loss:tokens[:chunk] measured from hidden states: plain, chunked and fused (plain only up to "
                    "--fused-plain-max tokens)")
    ap.add_argument("--fused-plain-max", type=int, default=4096,
                    help="largest --fused size also run the plain way (its logits + log-softmaxes must fit in RAM)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the --fused rows")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/kd_memory_cpu.json")
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="chunked", help=argparse.SUPPRESS)
    ap.add_argument("--loss", default="forward_kl", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=4096, help=argparse.SUPPRESS)
    return ap


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rad_ds.core.provenance import provenance, render_only, write_results

    if render_only(render, "benchmarks/results/kd_memory_cpu.json"):
        return
    a = _parser().parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return

    import torch

    t0 = time.perf_counter()
    rows, pairs = [], []
    for loss, tokens, chunk in _specs(a.pairs, a.chunk):
        old = measure(a, "autograd", loss, tokens, chunk)
        new = measure(a, "chunked", loss, tokens, chunk)
        rows += [old, new]
        grad = new["grad_gib"]
        pairs.append({"loss": loss, "tokens": tokens, "chunk_tokens": chunk,
                      "memory_ratio": new["peak_gib"] / old["peak_gib"],
                      "memory_ratio_beyond_grad": (new["peak_gib"] - grad) / (old["peak_gib"] - grad),
                      "grad_floor_ratio": grad / old["peak_gib"],
                      "held_ratio": new["held_after_forward_gib"] / old["held_after_forward_gib"],
                      "time_ratio": new["time_s"] / old["time_s"],
                      "value_rel_diff": abs(new["value"] - old["value"]) / abs(old["value"])})
    for loss, tokens, chunk in _specs(a.solo, a.chunk):
        rows.append(measure(a, "chunked", loss, tokens, chunk))
    fused_rows = []
    for loss, tokens, chunk in _specs(a.fused, a.chunk):
        for v in HEAD_VARIANTS:
            if v != "plain" or tokens <= a.fused_plain_max:
                fused_rows.append(measure(a, "head_" + v, loss, tokens, chunk))
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    res = {"provenance": provenance(), "vocab": a.vocab, "temperature": a.temperature, "threads": a.threads,
           "repeats": a.repeats,
           "ram_gib": ram_gib,
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "wall_s": time.perf_counter() - t0, "rows": rows, "ratios": pairs,
           "fused": {"hidden": a.hidden, "rows": fused_rows} if fused_rows else None}
    print(write_results(a.out, res, render).read_text())


def render(res: dict) -> str:
    """The results markdown, from the JSON that :func:`main` writes."""
    from rad_ds.core.provenance import provenance_line

    if not res["rows"]:  # a --fused-only run
        return "\n".join(render_fused(res["fused"], res) + ["", provenance_line(res["provenance"])]) + "\n"
    names = {"autograd": "plain autograd (previous)", "chunked": "chunked recompute (new)"}
    md = [
        "# Logit-loss memory: chunked recompute vs plain autograd (CPU)", "",
        (f"Student logits float32 requiring grad, teacher logits float32, vocab {res['vocab']}, every position "
        f"selected, T = {res['temperature']:g}; forward + backward of the loss sum, median of {res['repeats']} "
        f"runs, {res['threads']} threads ({res['cpus']} CPUs, {res['machine']}), torch {res['torch']}; "
        f"{res['wall_s']:.0f} s in all."), "",
        ("*Previous* = `kd_loss_sum_ref` / `ce_loss_sum_ref`: chunk by chunk through autograd (the code before "
        "the chunked functions). *New* = `kd_loss_sum` / `ce_loss_sum`: a custom autograd function that keeps only "
        "its inputs and a few floats per token, and recomputes each chunk's log-softmax in backward."), "",
        ("How it is measured: each row is a fresh subprocess. *Peak* = its peak RSS (`getrusage` `ru_maxrss`) minus "
        "its RSS once the inputs are allocated, so the inputs are not counted but the logits' gradient (tokens x "
        "vocab floats, which backward must produce whatever the loss) is. *Held* = RSS between forward and "
        "backward minus the same baseline: what the forward leaves alive. The children run with "
        "`MALLOC_MMAP_THRESHOLD_=65536`, so glibc maps each large tensor on its own and unmaps it on free and "
        "RSS follows the live tensors (torch's CPU allocator does not cache)."), "",
        "| loss | path | tokens | chunk | logits grad (GiB) | held after forward (GiB) | peak (GiB) | time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        md.append(f"| {r['loss']} | {names[r['variant']]} | {r['tokens']} | {r['chunk_tokens']} | "
                  f"{r['grad_gib']:.2f} | "
                  f"{r['held_after_forward_gib']:.2f} | {r['peak_gib']:.2f} | {r['time_s']:.2f} |")
    md += ["", ("| loss | tokens | chunk | peak new / old | floor: grad / old peak | (peak - grad) new / old | "
           "held new / old | time new / old | loss rel. diff |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in res["ratios"]:
        md.append(f"| {p['loss']} | {p['tokens']} | {p['chunk_tokens']} | **{p['memory_ratio']:.3f}** | "
                  f"{p['grad_floor_ratio']:.3f} | {p['memory_ratio_beyond_grad']:.3f} | {p['held_ratio']:.4f} | "
                  f"{p['time_ratio']:.3f} | {p['value_rel_diff']:.1e} |")
    md += _reading(res)
    md += ["", provenance_line(res["provenance"])]
    if res.get("fused"):
        md += [""] + render_fused(res["fused"], res)
        if "provenance" in res["fused"]:  # measured by a run of its own, merged into this file
            md += ["", provenance_line(res["fused"]["provenance"])]
    return "\n".join(md) + "\n"


def _reading(res: dict) -> list[str]:
    """The first section's reading, from its rows and ratios."""
    ratios = [p["memory_ratio"] for p in res["ratios"]]
    beyond = [p["memory_ratio_beyond_grad"] for p in res["ratios"]]
    held = [p["held_ratio"] for p in res["ratios"]]
    times = [p["time_ratio"] for p in res["ratios"]]
    ex = next(r for r in res["rows"] if r["variant"] == "chunked")
    buf = ex["chunk_tokens"] * res["vocab"] * 4 / GIB
    target = "is not met" if max(ratios) > 0.2 else "is met"
    md = [
        "", "## Reading", "",
        (f"- **Peak new / old: {min(ratios):.2f} to {max(ratios):.2f}; the target <= 0.2 {target} on this "
        "measure.** Both peaks contain the logits' gradient (4 bytes x tokens x vocab here), which is the floor "
        "of any loss's backward: grad / old peak is the best ratio possible, and the new path sits at the gradient "
        f"plus two float32 `chunk x vocab` buffers (three for jsd), e.g. {ex['grad_gib']:.2f} + 2 x {buf:.2f} GiB "
        f"for {ex['loss']} at {ex['tokens']} tokens (measured: {ex['peak_gib']:.2f} GiB). Going lower would mean "
        "writing the gradient into the logits' own storage, which the loss cannot do safely (the same logits feed "
        "the KD and the CE term, and the caller may read them)."),
        (f"- What the loss adds on top of the gradient, (peak - grad) new / old: {min(beyond):.2f} to "
        f"{max(beyond):.2f}. What the forward leaves alive, held new / old: {min(held):.4f} to {max(held):.4f} "
        "(a few floats per token instead of the float32 log-softmaxes of every chunk: 8 bytes x tokens x vocab "
        "for forward_kl, more for reverse_kl, jsd)."),
        ("- A smaller `loss.chunk_tokens` shrinks the chunk buffers (see the chunk-256 row); a bf16 student halves "
        "the gradient."),
        (f"- Time new / old: {min(times):.2f} to {max(times):.2f}. The closed-form backward makes a few elementwise "
        "passes per distribution and chunk and no reductions (it reuses the forward's logsumexps), where "
        "autograd ran the kl_div, log_softmax and index_select backwards (the last "
        "allocating a zero tokens x vocab tensor per chunk). The losses agree to float32 rounding (last column)."),
    ]
    olds = {(r["loss"], r["tokens"]): r for r in res["rows"] if r["variant"] == "autograd"}
    for r in res["rows"]:
        base = [o for (loss, n), o in olds.items() if loss == r["loss"] and n < r["tokens"]]
        if r["variant"] == "chunked" and base and (r["loss"], r["tokens"]) not in olds:
            o = max(base, key=lambda o: o["tokens"])
            need = o["peak_gib"] * r["tokens"] / o["tokens"] + r["inputs_gib"]
            md.append(f"- At {r['tokens']} tokens only the new path was run: peak {r['peak_gib']:.2f} GiB with a "
                      f"{r['grad_gib']:.2f} GiB gradient. The previous path would need about {need:.0f} GiB with its "
                      f"inputs (its {o['tokens']}-token peak scaled, plus {r['inputs_gib']:.1f} GiB of logits) on a "
                      f"machine of {res['ram_gib']:.0f} GiB shared with other work, so the comparison is made at "
                      "fewer tokens (see the first table).")
    return md


def render_fused(fused: dict, res: dict) -> list[str]:
    """The ``--fused`` section: from hidden states, plain vs chunked vs fused head + loss. ``fused`` carries its
    own run's settings and provenance when it was measured apart from ``res``."""
    rows = fused["rows"]
    res = {**res, **fused}
    md = [
        "## Fused LM head + KD loss vs logits (CPU)", "",
        (f"From the two models' final hidden states (hidden {res['hidden']}, float32, the student's requiring "
         f"grad) and frozen float32 LM heads at vocab {res['vocab']}, every position selected, T = "
         f"{res['temperature']:g}; forward + backward, median of {res['repeats']} runs, {res['threads']} threads "
         f"({res['cpus']} CPUs, {res['machine']}), torch {res['torch']}; {res['wall_s']:.0f} s in all. *Plain* = "
         "project both to logits, `kd_loss_sum_ref`; *chunked* = project, `kd_loss_sum`; *fused* = "
         "`fused_loss_sums` (rad_ds/distill/fused.py: chunks of `chunk` positions projected, scored and "
         "differentiated in one autograd function). Peak = peak RSS minus RSS once the inputs (hidden states and "
         "heads) are allocated, so it counts the logits and their gradient where a path makes them."), "",
        ("| loss | path | tokens | chunk | logits (GiB, one model) | peak (GiB) | time (s) | peak / plain | "
         "time / plain |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    plain = {(r["loss"], r["tokens"], r["chunk_tokens"]): r for r in rows if r["variant"] == "plain"}
    chunked = {(r["loss"], r["tokens"], r["chunk_tokens"]): r for r in rows if r["variant"] == "chunked"}
    for r in rows:
        p = plain.get((r["loss"], r["tokens"], r["chunk_tokens"]))
        ratio = f"{r['peak_gib'] / p['peak_gib']:.3f}" if p else "-"
        tr = f"{r['time_s'] / p['time_s']:.2f}" if p else "-"
        md.append(f"| {r['loss']} | {r['variant']} | {r['tokens']} | {r['chunk_tokens']} | {r['logits_gib']:.2f} | "
                  f"{r['peak_gib']:.2f} | {r['time_s']:.2f} | {ratio} | {tr} |")
    md += ["", "### Reading", ""]
    if fused.get("note"):
        md += [f"- This section was {fused['note']}."]
    for r in rows:
        if r["variant"] != "fused":
            continue
        key = (r["loss"], r["tokens"], r["chunk_tokens"])
        c = chunked.get(key)
        p = plain.get(key)
        if p is not None:
            md.append(f"- {r['tokens']} tokens: fused peak {r['peak_gib']:.2f} GiB = "
                      f"**{r['peak_gib'] / p['peak_gib']:.3f}x** plain ({p['peak_gib']:.2f} GiB), "
                      f"{r['peak_gib'] / c['peak_gib']:.3f}x chunked; step time "
                      f"**{r['time_s'] / p['time_s']:.2f}x** plain, {r['time_s'] / c['time_s']:.2f}x chunked; loss "
                      f"rel. diff to plain {abs(r['value'] - p['value']) / abs(p['value']):.1e}.")
        else:
            small = [q for q in plain.values() if q["loss"] == r["loss"] and q["tokens"] < r["tokens"]]
            est = ""
            if small:
                q = max(small, key=lambda q: q["tokens"])
                scaled = q["peak_gib"] * r["tokens"] / q["tokens"]
                est = (f"; plain was not run (it would need about {scaled:.0f} GiB, its {q['tokens']}-token peak "
                       f"scaled linearly, on a machine of {res['ram_gib']:.0f} GiB shared with other work): fused / "
                       f"that estimate = **{r['peak_gib'] / scaled:.3f}x**")
            md.append(f"- {r['tokens']} tokens: fused peak {r['peak_gib']:.2f} GiB = "
                      f"{r['peak_gib'] / c['peak_gib']:.3f}x chunked ({c['peak_gib']:.2f} GiB), step time "
                      f"{r['time_s'] / c['time_s']:.2f}x chunked{est}.")
    md.append("- What the fused path holds: a few float32 `chunk x vocab` buffers (the chunk's two logits, their "
              "log-softmaxes and gradient) and the `tokens x hidden` gradient of the hidden states; the logits "
              "paths hold both models' `tokens x vocab` logits and the student's logits gradient on top.")
    return md


if __name__ == "__main__":
    main()
