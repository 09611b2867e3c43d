"""Run the whole RAD pipeline from one YAML: diagnose -> replace -> distill -> export -> evaluate.

Each stage is skipped when its output exists, so running the same command again after a failure (or a
pre-emption) resumes where it stopped; distillation resumes from its latest checkpoint. Ends with a
base-vs-student comparison table (also OUT/comparison.md).

    python launchers/rad.py --config configs/rad_demo.yaml                 # stages with nproc ranks each
    python launchers/rad.py --config configs/rad_demo.yaml --out runs/rad2 --nproc 1
    python launchers/rad.py --config my.yaml --hostfile hostfile           # distributed stages multi-node

The YAML: out, model, k, nproc, hostfile, and one mapping per stage (diagnose, replace, distill,
evaluate) of extra flags for that stage's launcher; see configs/rad_demo.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rad_ds.cli import run_cli  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="pipeline YAML")
    ap.add_argument("--out", default=None, help="override the run directory")
    ap.add_argument("--model", default=None, help="override the base model")
    ap.add_argument("--nproc", type=int, default=None, help="override ranks per distributed stage")
    ap.add_argument("--hostfile", default=None, help="deepspeed hostfile for the distributed stages")
    args = ap.parse_args(argv)
    from rad_ds.pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig.load(args.config, {"out": args.out, "model": args.model, "nproc": args.nproc,
                                            "hostfile": args.hostfile})
    Pipeline(cfg).run()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
