"""Small helpers shared by the tests: a tiny hybrid config, mamba-ssm's pure-PyTorch references, and the CUDA
device of a kernel test.

``mamba_ref()`` gives the reference functions of mamba-ssm (``ssd_minimal_discrete``,
``ssd_chunk_scan_combined_ref``, ``selective_state_update_ref``, ``rms_norm_ref``) on any machine:
on a CPU-only machine ``import mamba_ssm`` fails (no ``selective_scan_cuda``, often no ``triton``), so
the modules holding these functions are imported with stand-ins for the missing compiled pieces,
without running ``mamba_ssm/__init__.py`` (which pulls in every CUDA extension). The stand-ins are
taken out of ``sys.modules`` again afterwards, so nothing else in the test session sees a fake
``triton`` or a half-imported ``mamba_ssm`` (``rad_ds.models.ssm_ops`` must still find "no kernels").

Two switches turn a skip that would hide a broken set-up into a failure (a switch is on when set and not "0"):
``RAD_DS_REQUIRE_MAMBA_REF=1`` (``scripts/test.sh`` sets it, so CI does): a mamba-ssm reference that does not
import fails the test that compares against it; ``RAD_DS_REQUIRE_KERNELS=1`` (``scripts/gpu_check.sh`` sets it):
a ``gpu`` test may not skip at all, for want of CUDA, kernels or anything else (``tests/conftest.py``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest

REQUIRE_MAMBA_REF = "RAD_DS_REQUIRE_MAMBA_REF"
REQUIRE_KERNELS = "RAD_DS_REQUIRE_KERNELS"
KERNELS_FIX = ("`pip install --no-build-isolation mamba-ssm==2.3.2.post1 causal-conv1d` (scripts/setup.sh does; on a "
               "device machine carry the wheels of scripts/gpu_wheels.sh)")


def switch(name: str) -> bool:
    """Whether the environment switch ``name`` is on (set, and neither empty nor "0")."""
    return os.environ.get(name, "0") not in ("", "0")


# where each reference lives in mamba-ssm 2.x
MAMBA_REFS = {
    "ssd_minimal_discrete": "mamba_ssm.modules.ssd_minimal",
    "ssd_chunk_scan_combined_ref": "mamba_ssm.ops.triton.ssd_combined",
    "selective_state_update_ref": "mamba_ssm.ops.triton.selective_state_update",
    "rms_norm_ref": "mamba_ssm.ops.triton.layernorm_gated",
}


def tiny_config(**overrides):
    """A 4-layer attention/mamba2 ``RadHybridConfig`` small enough for CPU tests.

    hidden 64, 4 heads of 16, 2 KV heads, so the Mamba2 layers have d_inner 64, d_xb 32, d_state 16,
    4 SSM heads and chunk size 16. Give ``num_hidden_layers`` alone to get alternating layer types.
    """
    from rad_ds.models import RadHybridConfig

    n_layers = overrides.get("num_hidden_layers", 4)
    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=[("attention", "mamba2")[i % 2] for i in range(n_layers)],
        max_position_embeddings=512,
        mamba_chunk_size=16,
    )
    kw.update(overrides)
    return RadHybridConfig(**kw)


# -- mamba-ssm references ------------------------------------------------------------------------


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    mod.__dict__.update(attrs)
    return mod


def _triton_stub() -> dict[str, types.ModuleType]:
    """Enough of ``triton`` for mamba-ssm's kernel modules to *define* their kernels (never run them)."""

    def passthrough_decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:  # bare @triton.jit
            return args[0]
        return lambda fn: fn

    def autotune(configs=(), *args, **kwargs):
        def deco(fn):
            fn.configs = list(configs)  # some modules read kernel.configs at import time
            return fn

        return deco

    class Config:
        def __init__(self, kwargs=None, num_warps=4, num_stages=2, **extra):
            self.kwargs, self.num_warps, self.num_stages = dict(kwargs or {}), num_warps, num_stages
            self.__dict__.update(extra)

    def anything(name):
        if name.startswith("__"):  # keep import machinery / introspection honest
            raise AttributeError(name)
        return Anything()

    class Anything:  # tl.float32, tl.math.exp, ... : any attribute, callable, usable as annotation
        def __getattr__(self, name):
            return anything(name)

        def __call__(self, *args, **kwargs):
            return Anything()

    tl = _stub("triton.language", constexpr=type("constexpr", (), {}))
    tl.__getattr__ = anything
    triton = _stub(
        "triton",
        __version__="3.0.0",
        jit=passthrough_decorator,
        autotune=autotune,
        heuristics=passthrough_decorator,
        Config=Config,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(int(n) - 1, 0).bit_length(),
        language=tl,
    )
    triton.__getattr__ = anything
    return {"triton": triton, "triton.language": tl}


def _bare_package(name: str) -> types.ModuleType | None:
    """Register package ``name`` without running its ``__init__`` (only its ``__path__`` is needed)."""
    parent, _, child = name.rpartition(".")
    if parent:
        base = sys.modules[parent].__path__
        spec = importlib.machinery.PathFinder.find_spec(child, base)
    else:
        spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    if parent:
        setattr(sys.modules[parent], child, mod)
    return mod


def _import_refs() -> dict:
    found, errors = {}, {}
    for fn, modname in MAMBA_REFS.items():
        try:
            found[fn] = getattr(importlib.import_module(modname), fn)
        except Exception as e:  # noqa: BLE001
            errors[fn] = f"{type(e).__name__}: {e}"
    return found, errors


@functools.lru_cache(maxsize=None)
def _load_mamba_refs() -> types.SimpleNamespace:
    before = set(sys.modules)
    found, errors = _import_refs()  # a working install (GPU machine) needs no help
    stubbed = False
    if errors:
        for name in set(sys.modules) - before:  # drop what the failed attempt half-imported
            if name.split(".")[0] == "mamba_ssm":
                del sys.modules[name]
        stubbed = True
        inserted = []
        try:
            missing = {}
            if importlib.util.find_spec("triton") is None:
                missing.update(_triton_stub())
            for ext in ("selective_scan_cuda", "causal_conv1d_cuda"):
                if importlib.util.find_spec(ext) is None:
                    missing[ext] = _stub(ext)
            for name, mod in missing.items():
                sys.modules[name] = mod
                inserted.append(name)
            if _bare_package("mamba_ssm") is None:
                raise ImportError("mamba_ssm is not installed")
            for pkg in ("mamba_ssm.utils", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.modules"):
                _bare_package(pkg)
            more, errors = _import_refs()
            found.update(more)
        except Exception as e:  # noqa: BLE001
            errors = {fn: f"{type(e).__name__}: {e}" for fn in MAMBA_REFS if fn not in found}
        finally:
            # the functions keep their module globals; the stand-ins must not leak into other tests
            for name in set(sys.modules) - before:
                if name in inserted or name.split(".")[0] == "mamba_ssm":
                    del sys.modules[name]
    ns = types.SimpleNamespace(**{fn: found.get(fn) for fn in MAMBA_REFS})
    ns.errors, ns.stubbed = errors, stubbed
    return ns


def mamba_ref(*required: str) -> types.SimpleNamespace:
    """mamba-ssm's pure-PyTorch references as a namespace (``None`` for any that did not import).

    ``pytest.skip``s (with the import error) when none imported, or when one of ``required`` is missing; under
    ``RAD_DS_REQUIRE_MAMBA_REF=1`` any missing one of those asked for fails the test instead. ``ns.stubbed`` tells
    whether stand-ins for triton / the CUDA extensions were needed.
    """
    ns = _load_mamba_refs()
    names = required or tuple(MAMBA_REFS)
    missing = [n for n in names if getattr(ns, n) is None]
    strict = switch(REQUIRE_MAMBA_REF)
    if missing and (required or len(missing) == len(MAMBA_REFS) or strict):
        why = "mamba-ssm reference(s) unavailable: " + "; ".join(f"{n}: {ns.errors.get(n)}" for n in missing)
        if strict:
            pytest.fail(f"{REQUIRE_MAMBA_REF}=1 (scripts/test.sh sets it) and {why}; bash scripts/setup.sh installs "
                        "mamba-ssm==2.3.2.post1 (pure Python on a CPU machine)", pytrace=False)
        pytest.skip(why)
    return ns


# -- the CUDA device of a kernel test --------------------------------------------------------------


def cuda_with_kernels():
    """``torch.device("cuda")`` for a ``gpu`` test of mamba-ssm's kernel path, or the reason it cannot run.

    Without CUDA it skips (CI has none), unless ``RAD_DS_REQUIRE_KERNELS=1``. With CUDA, kernels that do not
    import fail the test, never skip it: a green GPU run must mean the kernels ran. Only kernels switched off
    by hand (``RAD_DS_DISABLE_KERNELS=1``) skip, and under ``RAD_DS_REQUIRE_KERNELS=1`` even that fails.
    """
    import torch

    from rad_ds.models import ssm_ops

    strict = switch(REQUIRE_KERNELS)
    if not torch.cuda.is_available():
        if strict:
            pytest.fail(f"{REQUIRE_KERNELS}=1 but torch {torch.__version__} (CUDA build {torch.version.cuda}) sees "
                        "no CUDA device", pytrace=False)
        pytest.skip("needs a CUDA device")
    if ssm_ops._kernels() is not None:
        return torch.device("cuda")
    if ssm_ops._disabled():
        if strict:
            pytest.fail(f"RAD_DS_DISABLE_KERNELS is set and {REQUIRE_KERNELS}=1 asks for the kernels: unset one",
                        pytrace=False)
        pytest.skip("RAD_DS_DISABLE_KERNELS is set: the kernel path is switched off")
    why = ssm_ops._WHY_NOT[-1] if ssm_ops._WHY_NOT else "unknown reason"
    pytest.fail(f"CUDA is here but mamba-ssm's Triton kernels are not importable ({why}): install them with "
                f"{KERNELS_FIX}", pytrace=False)
