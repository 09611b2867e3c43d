"""Time the chunked SSD scan against the step-by-step recurrence (and, on CUDA, mamba-ssm's Triton kernel).

Shapes are those of one Mamba2 layer of a 135M student (SmolLM-135M: 9 heads of 64, d_state 64, one
B/C group per head), batch 1. For each length it times, as the median of several repetitions:

* ``chunked``   - ``ssd_scan.ssd_chunk_scan`` (pure PyTorch), at chunk size 64 (32 and 128 as extra rows);
* ``step_loop`` - ``ssd_scan.ssd_scan_ref``, the plain recurrence (fewer repetitions: it is slow);
* ``triton``    - ``ssm_ops.chunk_scan`` with mamba-ssm's kernels (CUDA only, when they import),

each for the forward (under ``torch.no_grad``) and forward + backward (``fwd_bwd``), and writes the
times and ratios (``speedup = step_loop / chunked``; on CUDA also ``torch_over_triton = chunked / triton``)
to a small JSON file and a markdown table.

    python benchmarks/ssm_scan.py                       # CPU, fp32, lengths 512 2048
    python benchmarks/ssm_scan.py --device cuda --dtype bf16 --out benchmarks/results/ssm_scan_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def make_runner(impl, inputs, chunk_size, mode):
    """A closure running one forward (no grad) or one forward + backward of ``impl``."""
    x, dt, A, B, C, D = inputs

    def call(x, dt, A, B, C, D):
        if impl == "chunked":
            return ssd_chunk_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, return_final_states=True)
        if impl == "step_loop":
            return ssd_scan_ref(x, dt, A, B, C, D=D, return_final_states=True)
        if impl == "triton":
            return ssm_ops.chunk_scan(x, dt, A, B, C, D, chunk_size)
        raise ValueError(impl)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                call(x, dt, A, B, C, D)
        return run

    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def run():
        for t in leaves:
            t.grad = None
        y, final = call(*leaves)
        (y.float().square().mean() + final.float().square().mean()).backward()

    return run


def fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:.2f}"


def main(argv=None):
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
    ap.add_argument("--reps", type=int, default=7, help="repetitions of the chunked scan / kernel (median)")
    ap.add_argument("--step-reps", type=int, default=2, help="repetitions of the slow step loop (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ssm_scan_<device>.json); "
                                                "a .md table is written next to it")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"ssm_scan_{device.type}.json")
    triton = device.type == "cuda" and ssm_ops.use_kernels(torch.empty(0, device=device))

    rows = []
    for length in args.lengths:
        inputs = make_inputs(length, args, device, dtype)
        configs = [(mode, args.chunk_size) for mode in ("fwd", "fwd_bwd")]
        configs += [("fwd", cs) for cs in args.extra_chunk_sizes if cs != args.chunk_size]
        step_times = {}
        for mode, cs in configs:
            row = {"length": length, "mode": mode, "chunk_size": cs}
            row["chunked_s"] = median_time(make_runner("chunked", inputs, cs, mode), args.reps, 2, device)
            if mode not in step_times:
                step_times[mode] = median_time(make_runner("step_loop", inputs, cs, mode), args.step_reps, 1, device)
            row["step_loop_s"] = step_times[mode]
            row["speedup"] = row["step_loop_s"] / row["chunked_s"]
            if triton:
                row["triton_s"] = median_time(make_runner("triton", inputs, cs, mode), args.reps, 3, device)
                row["torch_over_triton"] = row["chunked_s"] / row["triton_s"]
            rows.append(row)
            print(
                f"L={length:5d} {mode:7s} chunk={cs:3d}  chunked {fmt_ms(row['chunked_s'])} ms  "
                f"step-loop {fmt_ms(row['step_loop_s'])} ms  speed-up {row['speedup']:.1f}x"
                + (f"  triton {fmt_ms(row['triton_s'])} ms (torch/triton {row['torch_over_triton']:.1f}x)"
                   if triton else ""),
                flush=True,
            )

    result = {
        "benchmark": "ssm_scan",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"batch": args.batch, "heads": args.heads, "headdim": args.headdim, "d_state": args.d_state,
                  "groups": args.groups},
        "reps": {"chunked": args.reps, "step_loop": args.step_reps},
        "triton": triton,
        "rows": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"# SSD scan timings ({result['device']}, {args.dtype}, torch {torch.__version__}, "
                f"{result['threads']} threads)\n\n")
        s = result["shape"]
        f.write(f"batch {s['batch']}, heads {s['heads']} x headdim {s['headdim']}, d_state {s['d_state']}, "
                f"groups {s['groups']}; median of {args.reps} runs (step loop: {args.step_reps}). "
                "Speed-up = step loop / chunked.\n\n")
        head = "| length | mode | chunk | chunked (ms) | step loop (ms) | speed-up |"
        sep = "|---:|---|---:|---:|---:|---:|"
        if triton:
            head += " triton (ms) | torch / triton |"
            sep += "---:|---:|"
        f.write(head + "\n" + sep + "\n")
        for r in rows:
            line = (f"| {r['length']} | {r['mode']} | {r['chunk_size']} | {fmt_ms(r['chunked_s'])} | "
                    f"{fmt_ms(r['step_loop_s'])} | {r['speedup']:.1f}x |")
            if triton:
                line += f" {fmt_ms(r['triton_s'])} | {r['torch_over_triton']:.1f}x |"
            f.write(line + "\n")
    print(f"wrote {out} and {md}")
    return result


if __name__ == "__main__":
    main()
