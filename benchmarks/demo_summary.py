"""The README demo's perplexity target as a file: base vs student held-out perplexity of a finished
`bash scripts/demo.sh` run (`runs/rad-demo`, read through `EvalResults`), with the target (student within 5% of
the base) and the run's stage times.

    bash scripts/demo.sh && python benchmarks/demo_summary.py --run runs/rad-demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "rad-demo"))
    ap.add_argument("--wall-s", type=float, default=None, help="wall time of the demo command, if measured")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_cpu.json"))
    a = ap.parse_args()
    from rad_ds.core.provenance import provenance
    from rad_ds.eval.results import EvalResults

    run = Path(a.run)
    res = EvalResults.load(run / "eval")
    base, student = (res.score(m, "ppl")["score"] for m in res.models)
    pipeline = json.loads((run / "pipeline.json").read_text()) if (run / "pipeline.json").is_file() else {}
    out = {"benchmark": "demo", "provenance": provenance(), "config": "configs/rad_demo.yaml", "base_ppl": base, "student_ppl": student,
           "student_over_base": student / base, "target_student_over_base": 1.05,
           "met": student / base <= 1.05, "ppl_data": "HumanEval programs + reasoning-gym GSM solutions (n=8)",
           "wall_s": a.wall_s, "pipeline": pipeline}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"base ppl {base:.3f}, student ppl {student:.3f} ({student / base:.3f}x; target <= 1.05x)")


if __name__ == "__main__":
    main()
