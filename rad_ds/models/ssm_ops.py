"""Mamba2 operators, chosen per call from the tensor's device.

CUDA (when ``mamba_ssm`` / ``causal_conv1d`` import): mamba-ssm's Triton kernels
``mamba_chunk_scan_combined``, ``selective_state_update``, ``rmsnorm_fn`` and ``causal_conv1d_fn``.
CPU (or if those packages are missing): the pure-PyTorch chunked scan, ``F.conv1d``, a torch gated
RMSNorm and a torch decode step. Set ``RAD_DS_DISABLE_KERNELS=1`` to force the torch path everywhere.

``mamba_ssm`` is never imported at module level: on a CPU machine it fails to import
(its CUDA extension is missing), and the remote-code copy of the model must load without it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import types

import torch
import torch.nn.functional as F

from .ssd_scan import ssd_chunk_scan

logger = logging.getLogger(__name__)


def _import_triton_kernels():
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return {"scan": mamba_chunk_scan_combined, "step": selective_state_update, "norm": rmsnorm_fn}


_WHY_NOT: list[str] = []  # why the kernels could not be imported (for the error message)


def _disabled() -> bool:
    return os.environ.get("RAD_DS_DISABLE_KERNELS", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernels():
    """The GPU kernels as a dict, or ``None`` where they cannot be imported (the reason in ``_WHY_NOT``)."""
    if _disabled():
        return None
    missing = [m for m in ("triton", "mamba_ssm") if importlib.util.find_spec(m) is None]
    if missing:
        _WHY_NOT.append(f"{' and '.join(missing)} not installed")
        return None
    try:
        found = _import_triton_kernels()
    except ImportError as e:
        # mamba-ssm installed without its CUDA build (MAMBA_SKIP_CUDA_BUILD): the package __init__ wants
        # the compiled Mamba1 scan, which rad-ds never calls; its Triton kernels work without it
        if "selective_scan_cuda" not in str(e):
            _WHY_NOT.append(f"{type(e).__name__}: {e}")
            return None
        for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm"]:
            del sys.modules[name]
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        try:
            found = _import_triton_kernels()
        except Exception as e2:  # noqa: BLE001
            _WHY_NOT.append(f"{type(e2).__name__}: {e2}")
            return None
    except Exception as e:  # noqa: BLE001 - any other import failure means "no kernels"
        _WHY_NOT.append(f"{type(e).__name__}: {e}")
        return None
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update

        found["conv"], found["conv_update"] = causal_conv1d_fn, causal_conv1d_update
    except Exception:  # noqa: BLE001
        found["conv"] = found["conv_update"] = None
        logger.info("causal-conv1d is not importable: Mamba2's conv runs as F.conv1d (its kernels are optional)")
    return found


@functools.lru_cache(maxsize=None)
def _announce(path: str) -> None:
    logger.info("Mamba2 ops on CUDA: %s", path)


def use_kernels(t: torch.Tensor) -> bool:
    """True when ``t`` lives on CUDA and mamba-ssm's kernels are importable. On CUDA without them this is an
    error, never a silent fall-back to the far slower torch scan, unless ``RAD_DS_DISABLE_KERNELS=1`` asks
    for the torch path."""
    if not t.is_cuda:
        return False
    if _kernels() is not None:
        _announce("mamba-ssm Triton kernels")
        return True
    if _disabled():
        _announce("the pure-PyTorch scan (RAD_DS_DISABLE_KERNELS=1)")
        return False
    why = _WHY_NOT[-1] if _WHY_NOT else "unknown reason"
    raise RuntimeError(
        f"mamba-ssm's Triton kernels are not importable on this CUDA machine ({why}); install them with "
        "`pip install --no-build-isolation mamba-ssm==2.3.2.post1 causal-conv1d` (scripts/setup.sh does), or "
        "set RAD_DS_DISABLE_KERNELS=1 to run the pure-PyTorch scan (correct, far slower)"
    )


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """Depthwise causal conv + SiLU. ``x (b, d, l)``, ``weight (d, w)``, ``conv_state (b, d, w-1)``.
    ``seq_idx (b, l)``: document index per position of a packed row; no output sees an earlier document.

    Returns ``(y (b, d, l), new_state (b, d, w-1))``: the new state is the last ``w-1`` inputs (those of
    the last document only, when ``seq_idx`` is given).
    """
    w = weight.size(-1)
    if conv_state is None:
        full = F.pad(x, (w - 1, 0))
    else:
        full = torch.cat([conv_state.to(x.dtype), x], dim=-1)
    new_state = full[..., full.size(-1) - (w - 1):]
    k = _kernels() if use_kernels(x) else None
    if seq_idx is not None:
        # the positions before the row: none (-1) from scratch; the row's first document after a state
        first = seq_idx[:, :1] if conv_state is not None else torch.full_like(seq_idx[:, :1], -1)
        seq_full = torch.cat([first.expand(-1, w - 1), seq_idx], dim=1)
        new_state = new_state * (seq_full[:, -(w - 1):] == seq_idx[:, -1:]).to(x.dtype)[:, None, :]
        if k is not None and k["conv"] is not None and conv_state is None:
            # causal-conv1d takes seq_idx with a channel-last layout only
            x_cl = x.transpose(1, 2).contiguous().transpose(1, 2)
            return k["conv"](x_cl, weight, bias, seq_idx=seq_idx.to(torch.int32), activation="silu"), new_state
        return F.silu(_conv_within_documents(full, weight, bias, seq_full)), new_state
    if k is not None and k["conv"] is not None and conv_state is None:
        y = k["conv"](x, weight, bias, activation="silu")
    else:
        y = F.silu(F.conv1d(full, weight.unsqueeze(1), bias, groups=x.size(1)))
    return y, new_state


def _conv_within_documents(full, weight, bias, seq_full):
    """The causal conv of every document of a packed row on its own, in one ``F.conv1d``: each document is
    moved right by ``w-1`` zero columns per earlier document, so its window starts on zeros, as alone.
    ``full (b, d, w-1+l)`` holds the ``w-1`` positions before the row; ``seq_full (b, w-1+l)`` their
    documents (-1: nothing before the row)."""
    w = weight.size(-1)
    b, d, n = full.size(0), full.size(1), full.size(-1) - (w - 1)
    seq = seq_full[:, w - 1:]
    doc = seq - seq[:, :1]  # 0 for the row's first document (which may continue a state)
    at = torch.arange(w - 1, n + w - 1, device=full.device)[None] + (w - 1) * doc  # (b, n)
    width = int(at.max()) + 1
    spread = full.new_zeros(b, d, width)
    spread[..., :w - 1] = full[..., :w - 1]  # the state before the row (zeros from scratch)
    spread = spread.scatter(2, at[:, None, :].expand(b, d, n), full[..., w - 1:])
    y = F.conv1d(spread, weight.unsqueeze(1), bias, groups=d)  # (b, d, width - (w-1))
    return y.gather(2, (at - (w - 1))[:, None, :].expand(b, d, n))


def conv_step(x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor):
    """One decode step of the causal conv + SiLU: ``x_t (b, d)``, ``weight (d, w)``; ``conv_state (b, d, w-1)``
    is updated in place (its storage never moves, as a captured CUDA graph needs). Returns ``y_t (b, d)``.
    On CUDA: causal-conv1d's ``causal_conv1d_update`` where it is installed."""
    k = _kernels() if use_kernels(x_t) else None
    if k is not None and k.get("conv_update") is not None:
        return k["conv_update"](x_t, conv_state, weight, bias, "silu")
    window = torch.cat([conv_state.to(x_t.dtype), x_t[..., None]], dim=-1)  # (b, d, w)
    y = torch.einsum("bdw,dw->bd", window, weight)
    if bias is not None:
        y = y + bias
    conv_state.copy_(window[..., 1:])
    return F.silu(y)


def gated_rmsnorm(x, z, weight, eps: float, group_size: int):
    """``rmsnorm(x * silu(z)) * weight`` with the norm taken over groups of ``group_size`` channels."""
    if use_kernels(x):
        return _kernels()["norm"](x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
    return gated_rmsnorm_ref(x, z, weight, eps, group_size)


def gated_rmsnorm_ref(x, z, weight, eps: float, group_size: int):
    dtype = x.dtype
    h = x.float() * F.silu(z.float())
    shape = h.shape
    h = h.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.reshape(shape) * weight.float()).to(dtype)


def chunk_scan(x, dt, A, B, C, D, chunk_size: int, initial_states=None, seq_idx=None):
    """Chunked SSD scan returning ``(y, final_state)``; Triton on CUDA, torch otherwise. ``seq_idx (b, l)``
    resets the state at each document of a packed row."""
    if use_kernels(x):
        kw = {"seq_idx": seq_idx.to(torch.int32).contiguous()} if seq_idx is not None else {}
        y, final = _kernels()["scan"](
            x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states, return_final_states=True, **kw
        )
        return y, final
    return ssd_chunk_scan(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_states=initial_states, return_final_states=True,
        seq_idx=seq_idx,
    )


def scan_step(ssm_state, x_t, dt_t, A, B_t, C_t, D):
    """One decode step. ``ssm_state (b,h,p,n)`` (updated in place), ``x_t (b,h,p)``, ``dt_t (b,h)``,
    ``B_t, C_t (b,g,n)``; returns ``y_t (b,h,p)``."""
    h, p = x_t.shape[1], x_t.shape[2]
    n = B_t.size(-1)
    if use_kernels(x_t):
        # selective_state_update reads `dt_bias.stride(-1)` whenever dt and A are broadcast over the
        # head dim (its "tie_hdim" fast path), so it needs a (zero) dt_bias: None raises AttributeError
        zero_bias = torch.zeros(h, 1, device=x_t.device, dtype=torch.float32).expand(h, p)
        return _kernels()["step"](
            ssm_state,
            x_t,
            dt_t[..., None].expand(-1, -1, p),
            A[:, None, None].expand(h, p, n).float(),
            B_t,
            C_t,
            D[:, None].expand(h, p),
            dt_bias=zero_bias,
            dt_softplus=False,
        )
    # the CPU step in place as a few batched ops: s = s * exp(dt A) + (dt x) B^T, y = s C + D x
    b, g = x_t.size(0), B_t.size(1)
    Bh = B_t.repeat_interleave(h // g, dim=1) if g != h else B_t
    Ch = C_t.repeat_interleave(h // g, dim=1) if g != h else C_t
    dt = dt_t.float()
    s = ssm_state.view(b * h, p, n)
    s.mul_(torch.exp(dt * A.float()).view(b * h, 1, 1))
    s.baddbmm_((dt[..., None] * x_t.float()).view(b * h, p, 1), Bh.float().reshape(b * h, 1, n))
    y = torch.bmm(s, Ch.float().reshape(b * h, n, 1)).view(b, h, p)
    return y.addcmul_(x_t.float(), D.float()[None, :, None]).to(x_t.dtype)
