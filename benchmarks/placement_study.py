"""The placement study as a results file: a finished ``launchers/placement.py`` run's ``results.json`` copied to
``benchmarks/results/placement_cpu.json`` (its provenance is the study's own: the launcher's command and commit),
``curves.png`` beside it, and the ``.md`` rendered from the JSON by the study's own ``StudyResults.markdown``.

    python launchers/placement.py --config configs/placement_smollm2.yaml --out runs/placement
    python benchmarks/placement_study.py --study runs/placement
    python benchmarks/placement_study.py --render          # re-render placement_cpu.md from placement_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "placement_cpu.json"


def render(result: dict) -> str:
    """The study's own table (``rad_ds.study.results.StudyResults.markdown``), from the JSON alone."""
    from rad_ds.study.results import StudyResults

    return StudyResults(result).markdown()


def main(argv: list[str] | None = None) -> None:
    from rad_ds.core.provenance import RENDER_HELP, render_only, write_results
    from rad_ds.study.results import StudyResults

    if render_only(render, DEFAULT_OUT, argv):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", required=True, help="the --out of a finished launchers/placement.py run")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    a = ap.parse_args(argv)
    study = Path(a.study)
    result = json.loads((study / StudyResults.FILE).read_text())
    md = write_results(a.out, result, render)
    if (study / StudyResults.CHART).is_file():
        shutil.copyfile(study / StudyResults.CHART, Path(a.out).with_suffix(".png"))
    print(md.read_text())


if __name__ == "__main__":
    main()
