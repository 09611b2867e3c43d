"""The ``env`` step of the GPU check: the software it runs with (versions, and where each package was imported
from: the image or the carried wheels), whether mamba-ssm's kernels import, and the two ceilings every later figure
is set against, measured on this machine: device memory bandwidth (a large copy, bytes read + written) and the
bf16 matrix-product rate (an 8192^3 product on random data; a datasheet peak is only a lead).

    python scripts/gpu_check/env_probe.py --device cuda --out env.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PACKAGES = ("torch", "triton", "transformers", "deepspeed", "mamba-ssm", "causal-conv1d", "pydantic", "einops",
            "huggingface-hub", "numpy", "pytest", "pytest-xdist", "matplotlib")
# dense bf16 tensor-core peaks from the datasheets (SXM parts), for MFU; the measured product rate is recorded too
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "H800": 989.4, "GH200": 989.4}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
            out[name] = dist.version
            out[f"{name}_from"] = str(Path(dist.locate_file("")).resolve())
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def timed(fn, sync, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str, mib: int) -> float:
    """GB/s of a device-to-device copy of ``mib`` MiB, counting bytes read plus bytes written."""
    import torch

    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = timed(lambda: dst.copy_(src), sync, 10)
    return 2 * src.numel() * 4 / t / 1e9


def matmul_tflops(device: str, n: int, dtype) -> float:
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = timed(lambda: a @ b, sync, 10)
    return 2 * n**3 / t / 1e12


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    info = {"versions": versions(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    import torch

    from rad_ds.models import ssm_ops

    info["imports"] = {}
    for mod in ("transformers", "deepspeed", "pydantic"):  # what the later steps import: a broken one shows here
        try:
            __import__(mod)
            info["imports"][mod] = "ok"
        except Exception as e:  # noqa: BLE001
            info["imports"][mod] = f"{type(e).__name__}: {e}"

    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    kernels = ssm_ops._kernels() if a.device == "cuda" else None
    info["kernels"] = sorted(k for k, v in kernels.items() if v is not None) if kernels else None
    info["kernels_why_not"] = list(ssm_ops._WHY_NOT) or None
    if a.device == "cuda" and not torch.cuda.is_available():
        Path(a.out).write_text(json.dumps(info, indent=2) + "\n")  # the versions still come back
        print(f"env: FAIL: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU; without one, run "
              "--rehearse", file=sys.stderr)
        return 1
    if a.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count}
        peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in p.name), None)
        info["datasheet_bf16_tflops"] = peak
    else:
        info["gpu"] = None
        info["datasheet_bf16_tflops"] = None
    info["copy_gbs"] = round(copy_bandwidth_gbs(a.device, a.copy_mib), 1)
    info["matmul_bf16_tflops"] = round(matmul_tflops(a.device, a.matmul_n, torch.bfloat16), 2)
    Path(a.out).write_text(json.dumps(info, indent=2) + "\n")
    v = info["versions"]
    print(f"python {v['python']}, torch {v['torch']} (CUDA {info['torch_cuda']}), triton {v['triton']}, "
          f"transformers {v['transformers']}, deepspeed {v['deepspeed']}, mamba-ssm {v['mamba-ssm']}")
    print(f"gpu {info['gpu']}; kernels {info['kernels'] or 'none: ' + str(info['kernels_why_not'])}")
    print(f"copy {info['copy_gbs']} GB/s (read + write), bf16 matmul {info['matmul_bf16_tflops']} TFLOP/s "
          f"(n={a.matmul_n}; datasheet {info['datasheet_bf16_tflops']})")
    broken = {m: e for m, e in info["imports"].items() if e != "ok"}
    for m, e in broken.items():
        print(f"env: FAIL: import {m}: {e}", file=sys.stderr)
    if a.device == "cuda" and not kernels:
        print("env: FAIL: mamba-ssm's kernels do not import: " + "; ".join(ssm_ops._WHY_NOT), file=sys.stderr)
        return 1
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
