"""Every committed result can be regenerated and says how: each ``benchmarks/results/*.json`` records its
provenance (commit, dirty flag, command, date, versions, machine; reconstructed provenance says so), and the
``.md`` beside it is byte for byte what its script's ``render`` makes of that JSON (no hand-written text: a
reading of the results goes in ``docs/``). Rendering only, no benchmark runs. Also: the README's and the docs'
relative links resolve."""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# results file -> the script that writes and renders it, where its name is not ``<script>_<device>``
SCRIPTS = {"demo_cpu": "demo_summary", "distill_cpu": "distill_step", "gloo_allgather_cpu": "gloo_allgather_memory",
           "placement_cpu": "placement_study"}
FILES = sorted(RESULTS.glob("*.json"))


def script_for(stem: str) -> Path:
    return ROOT / "benchmarks" / f"{SCRIPTS.get(stem, stem.rsplit('_', 1)[0])}.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_there_are_results():
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_results_record_provenance(path):
    p = json.loads(path.read_text()).get("provenance")
    assert isinstance(p, dict), f"{path.name}: no 'provenance' (add 'provenance': provenance() to its script's result)"
    missing = {"commit", "dirty", "command", "date", "versions", "machine"} - set(p)
    assert not missing, f"{path.name}: provenance lacks {sorted(missing)}"
    rec = p.get("reconstructed", False)
    assert isinstance(rec, bool)
    assert isinstance(p["commit"], str) and re.fullmatch(r"[0-9a-f]{40}", p["commit"]), path.name
    assert isinstance(p["command"], str) and p["command"].startswith("python "), path.name
    assert isinstance(p["dirty"], bool) or (rec and p["dirty"] is None), path.name
    if p["date"] is not None or not rec:
        datetime.date.fromisoformat(p["date"][:10])  # an ISO date (time optional)
    v, m = p["versions"], p["machine"]
    assert isinstance(v, dict) and {"torch", "deepspeed", "transformers"} <= set(v), path.name
    assert all(isinstance(v[k], str) or (rec and v[k] is None) for k in ("torch", "deepspeed", "transformers"))
    assert isinstance(m, dict) and isinstance(m.get("device"), str) and m["device"], path.name
    assert (isinstance(m.get("cpus"), int) and m["cpus"] >= 1) or (rec and m.get("cpus") is None), path.name
    if rec:  # honest reconstruction: it says how, and names a commit that really wrote this file
        assert isinstance(p.get("note"), str) and p["note"] and isinstance(p.get("commit_date"), str)
        try:
            log = subprocess.run(["git", "log", "--format=%H", "--", str(path.relative_to(ROOT))], cwd=ROOT,
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pytest.skip("git unavailable")
        if log.returncode == 0 and log.stdout.strip():
            assert p["commit"] in log.stdout.split(), f"{path.name}: commit {p['commit'][:10]} never wrote it"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_markdown_is_rendered_from_the_json(path):
    md = path.with_suffix(".md")
    script = script_for(path.stem)
    assert md.is_file(), f"{md.name} missing: run `python {script.relative_to(ROOT)} --render`"
    assert script.is_file(), f"{path.name}: no script {script.relative_to(ROOT)} (add it to SCRIPTS)"
    rendered = load_script(script).render(json.loads(path.read_text()))
    assert rendered == md.read_text(), (f"{md.name} is not what its script renders from {path.name}: run "
                                        f"`python {script.relative_to(ROOT)} --render --out {path.relative_to(ROOT)}`"
                                        " (readings belong in docs/, not in the .md)")


def test_every_results_markdown_has_its_json():
    orphans = [md.name for md in RESULTS.glob("*.md") if not md.with_suffix(".json").is_file()]
    assert not orphans, f"results .md without a JSON to render them from: {orphans}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(md: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (outside code fences)."""
    out, fenced = set(), False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = doc.parent / path if path else doc
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to missing files or headings {broken}"
