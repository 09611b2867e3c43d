"""Time rad-ds' chunked SSD scan (the CPU path) against mamba-ssm's own pure-PyTorch references, the baseline a
user without the Triton kernels would pick (and, on CUDA, against mamba-ssm's Triton kernel).

Shapes are those of one Mamba2 layer of a 135M student (SmolLM-135M: 9 heads of 64, d_state 64, one
B/C group per head), batch 1. For each length it times, as the median of several repetitions:

* ``chunked``       - ``ssd_scan.ssd_chunk_scan`` (pure PyTorch), at chunk size 64 (32 and 128 as extra rows);
* ``mamba_ref``     - mamba-ssm's ``ssd_chunk_scan_combined_ref`` at the same chunk size (**the headline**);
* ``mamba_minimal`` - mamba-ssm's ``ssd_minimal_discrete`` (the SSD paper's listing), plus the D term;
* ``step_loop``     - ``ssd_scan.ssd_scan_ref``, the plain recurrence (fewer repetitions: it is slow);
* ``triton``        - ``ssm_ops.chunk_scan`` with mamba-ssm's kernels (CUDA only, when they import),

each for the forward (under ``torch.no_grad``) and forward + backward (``fwd_bwd``, loss: mean square of the
output), after checking that every implementation gives the same output. Ratios are ``impl / chunked`` times
(> 1: rad-ds faster). mamba-ssm's references import on a machine without CUDA through ``tests/helpers.py``.

    python benchmarks/ssm_scan.py                       # CPU, fp32, lengths 512 2048
    python benchmarks/ssm_scan.py --device cuda --dtype bf16 --out benchmarks/results/ssm_scan_cuda.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ssm_scan_cpu.json")

from rad_ds.models import ssm_ops  # noqa: E402
from rad_ds.models.ssd_scan import ssd_chunk_scan, ssd_scan_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def make_inputs(length, args, device, dtype):
    g = torch.Generator().manual_seed(0)
    b, h, p, n, ng = args.batch, args.heads, args.headdim, args.d_state, args.groups

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    x = rnd(b, length, h, p).to(device, dtype)
    dt = F.softplus(rnd(b, length, h) - 3).to(device)  # ~0.05, as Mamba2's dt init; float32 as in the mixer
    A = (-torch.exp(torch.rand(h, generator=g) * 2)).to(device)
    B = rnd(b, length, ng, n).to(device, dtype)
    C = rnd(b, length, ng, n).to(device, dtype)
    D = torch.ones(h, device=device)
    return x, dt, A, B, C, D


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, reps, warmup, device):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


IMPLS = ("chunked", "mamba_ref", "mamba_minimal", "step_loop")


def mamba_references():
    """mamba-ssm's own pure-PyTorch SSD references (``ssd_chunk_scan_combined_ref``, ``ssd_minimal_discrete``),
    importable without CUDA through ``tests/helpers.py``; a one-line exit when they are not installed."""
    import pytest

    from tests.helpers import mamba_ref

    try:
        return mamba_ref("ssd_chunk_scan_combined_ref", "ssd_minimal_discrete")
    except (pytest.skip.Exception, pytest.fail.Exception) as e:
        raise SystemExit(f"ssm_scan: {e}; bash scripts/setup.sh installs mamba-ssm (pure Python on a CPU machine)")


def make_runner(impl, inputs, chunk_size, mode, refs=None):
    """A closure running one forward (no grad) or one forward + backward of ``impl`` (loss: mean square of y)."""
    def call(x, dt, A, B, C, D):
        if impl == "chunked":
            return ssd_chunk_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D)
        if impl == "mamba_ref":  # mamba-ssm's chunked reference (the one its Triton kernels are tested against)
            return refs.ssd_chunk_scan_combined_ref(x, dt, A, B, C, chunk_size, D=D)
        if impl == "mamba_minimal":  # the SSD paper's minimal listing as mamba-ssm ships it; it has no D term
            h = x.size(2)  # float32 throughout: it asserts one dtype for all inputs
            Bh, Ch = (t.float().repeat_interleave(h // t.size(2), dim=2) for t in (B, C))
            y, _ = refs.ssd_minimal_discrete(x.float() * dt.unsqueeze(-1), A * dt, Bh, Ch, chunk_size)
            return (y + x.float() * D[:, None]).to(x.dtype)
        if impl == "step_loop":
            return ssd_scan_ref(x, dt, A, B, C, D=D)
        if impl == "triton":
            return ssm_ops.chunk_scan(x, dt, A, B, C, D, chunk_size)[0]
        raise ValueError(impl)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return call(*inputs)
        return run

    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def run():
        for t in leaves:
            t.grad = None
        y = call(*leaves)
        y.float().square().mean().backward()

    return run


def fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:.2f}"


def _parser():
    from rad_ds.core.provenance import RENDER_HELP

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--extra-chunk-sizes", type=int, nargs="*", default=[32, 128],
                    help="chunk sizes timed (forward only) as extra rows")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--d-state", type=int, default=64)
    ap.add_argument("--groups", type=int, default=9)
    ap.add_argument("--reps", type=int, default=7, help="repetitions of the chunked scans / kernel (median)")
    ap.add_argument("--step-reps", type=int, default=2, help="repetitions of the slow step loop (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ssm_scan_<device>.json); "
                                                "the .md is rendered next to it")
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    return ap


def _agreement(inputs, impls, chunk_size: int, refs) -> dict:
    """Largest |y - y_chunked| of every other implementation's forward: checked before any time counts."""
    with torch.no_grad():
        y = make_runner("chunked", inputs, chunk_size, "fwd", refs)().float()
        return {i: (make_runner(i, inputs, chunk_size, "fwd", refs)().float() - y).abs().max().item()
                for i in impls if i != "chunked"}


def _time_row(length: int, mode: str, cs: int, inputs, impls, refs, args, device, step_times: dict) -> dict:
    """Every implementation's median time at one (mode, chunk size), and its ratio to the chunked scan's. The step
    loop has no chunk size: it is timed once per mode (kept in ``step_times``)."""
    row = {"length": length, "mode": mode, "chunk_size": cs}
    for impl in impls:
        if impl == "step_loop":
            if mode not in step_times:
                step_times[mode] = median_time(make_runner(impl, inputs, cs, mode, refs), args.step_reps, 1, device)
            row["step_loop_s"] = step_times[mode]
        else:
            row[f"{impl}_s"] = median_time(make_runner(impl, inputs, cs, mode, refs), args.reps, 2, device)
    for impl in impls:
        if impl != "chunked":
            row[f"{impl}_over_chunked"] = row[f"{impl}_s"] / row["chunked_s"]
    return row


def _time_length(length: int, args, device, dtype, impls, refs) -> list[dict]:
    """The rows of one length: forward and forward + backward at ``--chunk-size``, forward at the extra sizes."""
    inputs = make_inputs(length, args, device, dtype)
    agree = _agreement(inputs, impls, args.chunk_size, refs)
    configs = [(mode, args.chunk_size) for mode in ("fwd", "fwd_bwd")]
    configs += [("fwd", cs) for cs in args.extra_chunk_sizes if cs != args.chunk_size]
    step_times, rows = {}, []
    for mode, cs in configs:
        row = _time_row(length, mode, cs, inputs, impls, refs, args, device, step_times)
        if cs == args.chunk_size and mode == "fwd":
            row["max_abs_diff_vs_chunked"] = agree
        rows.append(row)
        print(f"L={length:5d} {mode:7s} chunk={cs:3d}  " + "  ".join(
            f"{i} {fmt_ms(row[f'{i}_s'])} ms" for i in impls)
            + f"  mamba_ref/chunked {row['mamba_ref_over_chunked']:.2f}x", flush=True)
    return rows


def main(argv=None):
    from rad_ds.core.provenance import provenance, render_only, write_results

    if render_only(render, DEFAULT_OUT, argv):
        return None
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"ssm_scan_{device.type}.json")
    refs = mamba_references()
    triton = device.type == "cuda" and ssm_ops.use_kernels(torch.empty(0, device=device))
    impls = [*IMPLS, "triton"] if triton else list(IMPLS)
    rows = [row for length in args.lengths for row in _time_length(length, args, device, dtype, impls, refs)]
    result = {
        "benchmark": "ssm_scan",
        "provenance": provenance(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "shape": {"batch": args.batch, "heads": args.heads, "headdim": args.headdim, "d_state": args.d_state,
                  "groups": args.groups},
        "reps": {"chunked": args.reps, "step_loop": args.step_reps},
        "references_stubbed": bool(refs.stubbed),
        "impls": impls,
        "rows": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }
    print(write_results(out, result, render, indent=1).read_text())
    return result


NAMES = {"chunked": "rad-ds chunked", "mamba_ref": "mamba-ssm `ssd_chunk_scan_combined_ref`",
         "mamba_minimal": "mamba-ssm `ssd_minimal_discrete`", "step_loop": "step loop", "triton": "Triton kernel"}


def render(result: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    impls, s = result["impls"], result["shape"]
    others = [i for i in impls if i != "chunked"]
    md = [f"# SSD scan timings ({result['device']}, {result['dtype']}, {result['threads']} threads)", "",
          f"One Mamba2 layer of a 135M student: batch {s['batch']}, heads {s['heads']} x headdim {s['headdim']}, "
          f"d_state {s['d_state']}, groups {s['groups']}; median of {result['reps']['chunked']} runs (step loop: "
          f"{result['reps']['step_loop']}). The baseline is mamba-ssm's own pure-PyTorch chunked reference "
          "(`ssd_chunk_scan_combined_ref`, what a user without the kernels would call); `x / chunked` = that "
          "implementation's time over rad-ds' chunked scan's (> 1: rad-ds faster). fwd_bwd: forward + backward "
          "of the mean square of the output.", "",
          "| length | mode | chunk | " + " | ".join(f"{NAMES[i]} (ms)" for i in impls) + " | "
          + " | ".join(f"{i} / chunked" for i in others) + " |",
          "|---:|---|---:|" + "---:|" * (len(impls) + len(others))]
    for r in result["rows"]:
        md.append(f"| {r['length']} | {r['mode']} | {r['chunk_size']} | "
                  + " | ".join(fmt_ms(r.get(f"{i}_s")) for i in impls) + " | "
                  + " | ".join(f"**{r[f'{i}_over_chunked']:.2f}x**" if i == "mamba_ref" else
                               f"{r[f'{i}_over_chunked']:.2f}x" for i in others) + " |")
    diffs = [(r["length"], r["max_abs_diff_vs_chunked"]) for r in result["rows"] if "max_abs_diff_vs_chunked" in r]
    md += ["", "Largest |y - y_chunked| per implementation, forward: " + "; ".join(
        f"L={n}: " + ", ".join(f"{i} {d[i]:.1e}" for i in others) for n, d in diffs) + ".", "",
        provenance_line(result["provenance"])]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
