"""How much host memory an all-gather over gloo needs beyond its output: 2 ranks on this machine gather a
``--mib`` MiB tensor (each rank holds half) into a preallocated output, and each rank's peak RSS growth during
the call is reported. torch's ProcessGroupGloo stages the gather through a flat buffer of the output's size,
so the growth is about one output; NCCL gathers in place. This is why a ZeRO-3 rank on CPU holds its largest
parameter twice while it is gathered (``benchmarks/results/zero3_memory_cpu.md``).

    python benchmarks/gloo_allgather_memory.py --out benchmarks/results/gloo_allgather_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hwm_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rank(rank: int, world: int, port: int, mib: int, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    part = torch.randn(mib * 2**20 // 4 // world)
    out = torch.zeros(part.numel() * world)  # touched: its pages are resident before the gather
    before = _hwm_mib()
    dist.all_gather_into_tensor(out, part)
    queue.put({"rank": rank, "output_mib": out.numel() * 4 / 2**20, "peak_growth_mib": _hwm_mib() - before})
    dist.destroy_process_group()


def render(result: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    md = [f"# Peak RSS growth of one gloo all-gather into a preallocated output ({result['world']} ranks)", "",
          "| rank | output (MiB) | peak growth during the call (MiB) |", "|---:|---:|---:|"]
    md += [f"| {r['rank']} | {r['output_mib']:.0f} | {r['peak_growth_mib']:.0f} |" for r in result["rows"]]
    md += ["", provenance_line(result["provenance"])]
    return "\n".join(md) + "\n"


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from rad_ds.core.provenance import RENDER_HELP, provenance, render_only, write_results

    default_out = ROOT / "benchmarks" / "results" / "gloo_allgather_cpu.json"
    if render_only(render, default_out):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=192, help="size of the gathered tensor (192: a 49152 x 1024 "
                                                         "float32 embedding)")
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    a = ap.parse_args()
    import torch.multiprocessing as mp

    from tests.distill_helpers import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, a.mib, queue)) for r in range(2)]
    for p in procs:
        p.start()
    rows = sorted((queue.get(timeout=300) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    result = {"benchmark": "gloo_allgather_memory", "provenance": provenance(), "world": 2, "rows": rows}
    print(write_results(a.out, result, render).read_text())


if __name__ == "__main__":
    main()
