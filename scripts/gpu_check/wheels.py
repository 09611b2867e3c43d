"""The wheels carried to the lent GPU machine (``.whl/``, made by ``scripts/gpu_wheels.sh``): checked here, before a
device call, for the device's Python (3.12 on x86-64 Linux) and for the 64 MiB that may travel with the tree; there,
only the distributions the device image lacks are installed (``--no-index --no-deps`` into a ``--target`` folder
put on ``PYTHONPATH``), so the check runs on the image's own torch, triton and transformers.

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

DEVICE_PYTHON = (3, 12)
DEVICE_GLIBC = (2, 39)  # the image's Python 3.12.3 is Ubuntu 24.04's: glibc 2.39
CARRY_LIMIT = 64 * 2**20  # what travels with a device call: the tree, shared/ and the carried paths together
# what the image lacks and the check needs (KINDS.md's package list): without these the kernels or DeepSpeed do not
# import there. Everything else the check imports (torch, triton, transformers, einops, ...) is the image's own.
NEEDED = ("deepspeed", "mamba-ssm", "pydantic", "pydantic-core", "hjson", "annotated-types", "typing-inspection")

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-(?P<abi>[^-]+)"
                    r"-(?P<plat>[^-]+)\.whl$")


def canonical(name: str) -> str:
    """PEP 503 name: ``Pydantic_Core`` -> ``pydantic-core``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel_name(filename: str) -> dict | None:
    """``{"name", "version", "py", "abi", "plat"}`` of a PEP 427 wheel file name, or None if it is not one."""
    m = _WHEEL.match(filename)
    if not m:
        return None
    d = m.groupdict()
    return {"name": canonical(d["name"]), "version": d["version"], "py": d["py"], "abi": d["abi"], "plat": d["plat"]}


def _platform_ok(plat: str) -> bool:
    if plat in ("any", "linux_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"):
        return True
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", plat)
    return bool(m) and (int(m[1]), int(m[2])) <= DEVICE_GLIBC


def tag_problem(wheel: dict, python: tuple[int, int] = DEVICE_PYTHON) -> str | None:
    """Why pip on the device's Python would refuse this wheel (None: it installs). A compressed tag set
    (``py2.py3``, ``manylinux_2_17_x86_64.manylinux2014_x86_64``) fits if one of its tags fits."""
    cp = f"cp{python[0]}{python[1]}"
    pys = wheel["py"].split(".")
    if not any(t in (cp, f"py{python[0]}", f"py{python[0]}{python[1]}") for t in pys):
        abi3 = wheel["abi"] == "abi3" and any(re.fullmatch(r"cp3(\d+)", t) and int(t[3:]) <= python[1] for t in pys)
        if not abi3:
            return f"Python tag {wheel['py']} is not for Python {python[0]}.{python[1]} (want {cp}, py3 or abi3)"
    if not any(a in ("none", "abi3", cp) for a in wheel["abi"].split(".")):
        return f"ABI tag {wheel['abi']} is not {cp}, abi3 or none"
    if not any(_platform_ok(p) for p in wheel["plat"].split(".")):
        return (f"platform tag {wheel['plat']} does not run on x86-64 Linux with glibc "
                f"{DEVICE_GLIBC[0]}.{DEVICE_GLIBC[1]} (want any, linux_x86_64 or manylinux*_x86_64)")
    return None


def tree_bytes(root: Path) -> int | None:
    """Bytes of what a device call sends besides the carried paths: tracked files and untracked files git does not
    ignore (None where git cannot say, e.g. on the device, whose copy has no .git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for name in out.decode(errors="replace").split("\0"):
        p = root / name
        if name and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def check_wheels(wheel_dir: Path, tree: int | None = None, limit: int = CARRY_LIMIT,
                 python: tuple[int, int] = DEVICE_PYTHON, needed=NEEDED) -> dict:
    """Check ``wheel_dir`` for the device: every file a wheel pip there accepts, one version per distribution,
    the ``needed`` ones present, and the wheels plus ``tree`` bytes under ``limit``. Returns
    ``{"ok", "wheels": [{"file", "name", "version", "bytes", "problem"}], "problems", "wheel_bytes", "tree_bytes",
    "total_bytes", "limit_bytes"}``."""
    wheel_dir = Path(wheel_dir)
    problems, wheels = [], []
    if not wheel_dir.is_dir():
        problems.append(f"{wheel_dir} does not exist: make it with `bash scripts/gpu_wheels.sh` (needs PyPI)")
        files = []
    else:
        files = sorted(p for p in wheel_dir.iterdir() if not p.name.startswith("."))
    by_name: dict[str, list[str]] = {}
    for f in files:
        size = f.stat().st_size if f.is_file() else 0
        w = parse_wheel_name(f.name)
        if w is None:
            problem = "not a wheel file name (NAME-VERSION-PY-ABI-PLATFORM.whl); pip install .whl/*.whl would fail"
            row = {"file": f.name, "name": None, "version": None, "bytes": size, "problem": problem}
        else:
            problem = tag_problem(w, python)
            row = {"file": f.name, "name": w["name"], "version": w["version"], "bytes": size, "problem": problem}
            by_name.setdefault(w["name"], []).append(w["version"])
        if row["problem"]:
            problems.append(f"{wheel_dir / f.name}: {row['problem']}")
        wheels.append(row)
    for name, versions in sorted(by_name.items()):
        if len(versions) > 1:
            problems.append(f"{wheel_dir}: {name} in {len(versions)} versions ({', '.join(versions)}): keep one, or "
                            "pip stops the whole install")
    for name in needed:
        if name not in by_name and wheel_dir.is_dir():
            problems.append(f"{wheel_dir}: no {name} wheel, and the device image lacks it: "
                            "re-run scripts/gpu_wheels.sh")
    wheel_bytes = sum(w["bytes"] for w in wheels)
    total = wheel_bytes + (tree or 0)
    if total > limit:
        problems.append(f"wheels ({wheel_bytes / 2**20:.1f} MiB) + tree ({(tree or 0) / 2**20:.1f} MiB) = "
                        f"{total / 2**20:.1f} MiB > {limit / 2**20:.0f} MiB that may travel with a device call: "
                        "drop wheels the image already has, or ignore large untracked files")
    return {"ok": not problems, "wheels": wheels, "problems": problems, "wheel_bytes": wheel_bytes,
            "tree_bytes": tree, "total_bytes": total, "limit_bytes": limit}


def installed_version(name: str) -> str | None:
    """The version of distribution ``name`` this interpreter sees, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _packaging():
    """``packaging``'s Requirement and Version (the image has it; pip vendors it where it is not installed)."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pragma: no cover - pip's own copy
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def wheel_requirements(path: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA (none for a file that is not a readable wheel)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = z.read(meta).decode(errors="replace") if meta else ""
    except (OSError, zipfile.BadZipFile):
        return []
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def install_missing(wheel_dir: Path, target: Path, python: str = sys.executable, log=print) -> dict:
    """Install, from ``wheel_dir``, only what this interpreter lacks, into ``target`` (``--no-index --no-deps``; the
    caller puts ``target`` on ``PYTHONPATH``, ahead of the image's site-packages): every distribution it does not
    have, and a carried one it has in a version that a wheel being installed refuses (``Requires-Dist``, e.g. pydantic
    2.14 wants typing-extensions >= 4.16). Returns ``{"installed": {name: version}, "upgraded": {name: why}, "kept":
    {name: why}, "missing": [needed names with neither], "conflicts": [needs no carried wheel meets]}``."""
    Requirement, Version = _packaging()
    wheel_dir = Path(wheel_dir)
    carried = {}
    for f in sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []:
        w = parse_wheel_name(f.name)
        if w is not None:
            carried[w["name"]] = (f, w)
    chosen = {n for n in carried if installed_version(n) is None}
    upgraded, conflicts = {}, []
    todo = list(chosen)
    while todo:  # what the chosen wheels need, which the image has too old
        name = todo.pop()
        for line in wheel_requirements(carried[name][0]):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonical(req.name)
            have = None if dep in chosen else installed_version(dep)
            if have is None or req.specifier.contains(Version(have), prereleases=True):
                continue
            if dep in carried and req.specifier.contains(Version(carried[dep][1]["version"]), prereleases=True):
                chosen.add(dep)
                todo.append(dep)
                upgraded[dep] = f"the image's {have} is refused by {name} ({req.specifier}); carried " \
                                f"{carried[dep][1]['version']} installed"
            else:
                conflicts.append(f"{name} needs {dep}{req.specifier}, the image has {have} and no carried wheel fits: "
                                 f"add {dep} to scripts/gpu_wheels.sh")
    kept = {n: f"{installed_version(n)} (the image's; carried {w['version']} unused)"
            for n, (_, w) in carried.items() if n not in chosen}
    missing = [n for n in NEEDED if installed_version(n) is None and n not in chosen]
    if chosen:
        files = [str(carried[n][0]) for n in sorted(chosen)]
        cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--upgrade", "--target", str(target), *files]
        log("$ " + " ".join(cmd[:12]) + f" ... ({len(files)} wheels)")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip install --target {target} failed ({r.returncode}):\n{r.stdout[-2000:]}"
                               f"{r.stderr[-2000:]}")
    return {"installed": {n: carried[n][1]["version"] for n in sorted(chosen)}, "upgraded": upgraded, "kept": kept,
            "missing": missing, "conflicts": conflicts}


def format_report(report: dict) -> str:
    """The check as lines a person reads."""
    lines = [f"{w['file']}  {w['bytes'] / 2**20:.2f} MiB  {'ok' if not w['problem'] else 'PROBLEM: ' + w['problem']}"
             for w in report["wheels"]]
    tree = report["tree_bytes"]
    lines.append(f"wheels {report['wheel_bytes'] / 2**20:.1f} MiB + tree "
                 f"{'?' if tree is None else f'{tree / 2**20:.1f}'} MiB = {report['total_bytes'] / 2**20:.1f} MiB "
                 f"(limit {report['limit_bytes'] / 2**20:.0f} MiB)")
    lines += [f"problem: {p}" for p in report["problems"]]
    lines.append("wheels: ok for the device (Python %d.%d, x86-64)" % DEVICE_PYTHON if report["ok"]
                 else f"wheels: {len(report['problems'])} problem(s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``--check DIR`` (here, before a device call) or ``--install DIR --target T --report J`` (the GPU check's
    install step, there)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", metavar="DIR", help="check DIR's wheels for the device and the carry limit")
    ap.add_argument("--install", metavar="DIR", help="install DIR's wheels that this interpreter lacks")
    ap.add_argument("--target", help="where --install puts them (put it on PYTHONPATH)")
    ap.add_argument("--report", help="--install: write what was installed and kept as JSON here")
    a = ap.parse_args(argv)
    if a.check:
        root = Path(__file__).resolve().parents[2]
        report = check_wheels(Path(a.check), tree=tree_bytes(root))
        print(format_report(report))
        return 0 if report["ok"] else 1
    if not (a.install and a.target):
        ap.error("give --check DIR, or --install DIR --target FOLDER")
    wheel_dir = Path(a.install)
    if wheel_dir.is_dir():  # the tags only: the tree's size is unknown there (no .git)
        for problem in check_wheels(wheel_dir, needed=())["problems"]:
            print(f"warning: {problem}")
    result = install_missing(wheel_dir, Path(a.target))
    result["wheel_dir"] = str(wheel_dir)
    for name, version in result["installed"].items():
        print(f"installed {name} {version} (carried) into {a.target}")
    for name, why in result["upgraded"].items():
        print(f"upgraded {name}: {why}")
    for name, why in result["kept"].items():
        print(f"kept {name} {why}")
    for c in result["conflicts"]:
        print(f"warning: {c}")
    if not result["installed"]:
        print(f"nothing to install: the interpreter has every carried distribution"
              f"{'' if wheel_dir.is_dir() else f' ({wheel_dir} does not exist)'}")
    if a.report:
        Path(a.report).write_text(json.dumps(result, indent=2) + "\n")
    if result["missing"]:
        print(f"FAIL: {', '.join(result['missing'])} neither installed nor carried: make .whl/ with "
              "scripts/gpu_wheels.sh here and carry it (carry: [\".whl\"])", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
