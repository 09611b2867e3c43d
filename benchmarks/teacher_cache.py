"""Offline teacher cache vs the online teacher: step time, peak memory, cache size, and a placement study's
total time with one shared cache vs a teacher per run.

SmolLM2-135M-Instruct (the embedded default, fp32) self-distilled on the bundled demo chats (packed, prompts
masked), ``--steps`` steps of ``micro_batch x seq_len`` tokens on one process (DeepSpeed ZeRO-3 over a gloo
group of one). Each run is its own process (``launchers/*.py``), so peak RSS is that run's own.

* ``online shared``: the default self-distillation (one copy of the frozen weights, the teacher stream inside
  the student engine; the layers below the first replaced one run once for both);
* ``online replicated``: a second, whole teacher model (what a larger teacher of the same vocabulary costs
  when it fits: the two-model path);
* ``cache``: ``launchers/teacher_cache.py`` once (k=64, float16 values), then runs that read it.

Step time = median ``step_s`` over the steps after the first. A placement study's teacher cost: the S students
(different layer sets) distilled with their teacher online, against one cache build + S runs reading it (process
wall times, start-up included; ``launchers/placement.py`` does exactly this with ``cache_k`` > 0, and its
selection and held-out scoring cost the same either way). Break-even: the steps per student after which the
cache's build is paid back by the step time it saves.

    python benchmarks/teacher_cache.py --out benchmarks/results/teacher_cache_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "rad_ds" / "data" / "demo_chat.jsonl"
STUDENTS = ([20, 25], [5, 17], [3, 29])  # the demo's selection, and two other placements of a study


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    return env


def _launch(script: str, args: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "launchers" / script), *args], env=_env(), capture_output=True,
                       text=True)
    if p.returncode != 0:
        sys.exit(f"{script} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def distill_run(out: Path, layers, a, placement: str | None = None, cache: Path | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["--model", "embedded:smollm2", "--layers", ",".join(map(str, layers)), "--data", str(DATA),
            "--out", str(out), "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--micro-batch",
            str(a.micro_batch), "--no-wandb", "--log.progress=false", "--loss.hidden_weight=0",
            "--checkpoint.export_final=false", "--optim.lr=1e-3"]
    if placement:
        args.append(f"--teacher.location={placement}")
    if cache:
        args.append(f"--teacher.cache={cache}")
    wall = _launch("distill.py", args)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    times = [r["step_s"] for r in rows[1:]]
    return {"layers": list(layers), "placement": summary["teacher_placement"], "wall_s": wall,
            "step_s_median": statistics.median(times), "step_s": times, "peak_mem_mb": summary["peak_mem_mb"],
            "tokens_per_s": summary["tokens_per_s"], "losses": [r["loss"] for r in rows]}


def build_cache(out: Path, a) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    wall = _launch("teacher_cache.py", ["--teacher", "embedded:smollm2", "--data", str(DATA), "--seq-len",
                                        str(a.seq_len), "--k", str(a.k), "--out", str(out), "--progress=false"])
    m = json.loads((out / "manifest.json").read_text())
    t = m["totals"]
    return {"wall_s": wall, "k": a.k, "values_dtype": m["fingerprint"]["values_dtype"], "rows": t["rows"],
            "positions": t["positions"], "bytes": t["bytes"], "bytes_per_position": t["bytes"] / t["positions"],
            "bytes_per_position_nominal": t["bytes_per_position_nominal"],
            "data_tokens": t["rows"] * a.seq_len, "bytes_per_data_token": t["bytes"] / (t["rows"] * a.seq_len)}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from rad_ds.core.provenance import RENDER_HELP, provenance, render_only, write_results

    default_out = ROOT / "benchmarks" / "results" / "teacher_cache_cpu.json"
    if render_only(render, default_out):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/rad_ds_teacher_cache")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    cache = build_cache(work / "cache", a)
    online = [distill_run(work / f"online_{i}", s, a) for i, s in enumerate(STUDENTS)]
    cached = [distill_run(work / f"cached_{i}", s, a, cache=work / "cache") for i, s in enumerate(STUDENTS)]
    replicated = distill_run(work / "replicated", STUDENTS[0], a, placement="replicated")
    # a placement study's teacher cost: S students (different layers) each with its teacher online, against one
    # cache build + S students reading it (the students' selection and held-out scoring cost the same in both)
    study_online = sum(r["wall_s"] for r in online)
    study_cache = cache["wall_s"] + sum(r["wall_s"] for r in cached)
    rows = []
    for on, ca in zip(online, cached):
        rows.append({"layers": on["layers"], "step_time_ratio_vs_shared": ca["step_s_median"] / on["step_s_median"],
                     "peak_mem_ratio_vs_shared": ca["peak_mem_mb"] / on["peak_mem_mb"],
                     "loss_rel_diff_step1": abs(ca["losses"][0] - on["losses"][0]) / on["losses"][0]})
    result = {
        "benchmark": "teacher_cache", "provenance": provenance(),
        "model": "embedded:smollm2 (SmolLM2-135M-Instruct, float32)",
        "data": "rad_ds/data/demo_chat.jsonl (packed, prompts masked)", "steps": a.steps, "seq_len": a.seq_len,
        "micro_batch": a.micro_batch, "cache": cache, "online_shared": online, "cached": cached,
        "online_replicated": replicated, "per_student": rows,
        "step_time_ratio_vs_replicated": cached[0]["step_s_median"] / replicated["step_s_median"],
        "placement_study": {"students": len(STUDENTS), "online_s": study_online, "cache_s": study_cache,
                            "ratio": study_cache / study_online},
        "targets": {"step_time_ratio_vs_shared": 0.6, "bytes_per_position_k64": 600},
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
    }
    print(write_results(a.out, result, render).read_text())


def render(result: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    cache, online, cached = result["cache"], result["online_shared"], result["cached"]
    replicated, t = result["online_replicated"], result["targets"]
    md = [f"# Teacher cache vs online teacher (SmolLM2-135M-Instruct, fp32, {result['micro_batch']} x "
          f"{result['seq_len']} tokens a step, {result['steps']} steps, 1 process, {result['cpus']} CPU cores)", "",
          f"Cache: k={cache['k']}, {cache['values_dtype']} values, {cache['positions']} positions of {cache['rows']} "
          f"rows, **{cache['bytes_per_position']:.0f} bytes per cached position** (nominal "
          f"{cache['bytes_per_position_nominal']}; target <= {t['bytes_per_position_k64']} at k=64), "
          f"{cache['bytes_per_data_token']:.0f} bytes per data token (only counted positions are stored), built in "
          f"{cache['wall_s']:.1f} s.", "",
          "| replaced layers | teacher | median step (s) | peak RSS (MiB) | tokens/s | process wall (s) |",
          "|---|---|---:|---:|---:|---:|"]
    for r in [*online, *cached, replicated]:
        md.append(f"| {r['layers']} | {r['placement']} | {r['step_s_median']:.3f} | {r['peak_mem_mb']:.0f} | "
                  f"{r['tokens_per_s']:.0f} | {r['wall_s']:.1f} |")
    md.append("")
    for r in result["per_student"]:
        md.append(f"- layers {r['layers']}: cached / online-shared step time **{r['step_time_ratio_vs_shared']:.3f}** "
                  f"(target <= {t['step_time_ratio_vs_shared']}), peak RSS {r['peak_mem_ratio_vs_shared']:.3f}x")
    md.append(f"- layers {replicated['layers']}: cached / online-replicated step time "
              f"**{result['step_time_ratio_vs_replicated']:.3f}**")
    ps = result["placement_study"]
    saved = statistics.mean(o["step_s_median"] - c["step_s_median"] for o, c in zip(online, cached))
    be = "-" if saved <= 0 else f"{cache['wall_s'] / (len(online) * saved):.0f}"
    md.append(f"- a placement study's distillation ({ps['students']} students of {result['steps']} steps, process "
              f"wall time): online teachers {ps['online_s']:.0f} s, one cache + cached runs {ps['cache_s']:.0f} s "
              f"(**{ps['ratio']:.2f}x**, the cache build {cache['wall_s']:.0f} s of it); break-even after "
              f"{be} steps per student")
    md += ["", provenance_line(result["provenance"])]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
