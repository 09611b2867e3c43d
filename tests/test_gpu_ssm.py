"""On CUDA: mamba-ssm's Triton kernels (the path ``ssm_ops`` takes on GPU) against the pure-PyTorch path.

The torch side is ``ssd_scan.ssd_chunk_scan`` / ``ssm_ops.gated_rmsnorm_ref`` called directly, or the whole
of ``ssm_ops`` with ``_kernels`` patched to ``None`` (what ``RAD_DS_DISABLE_KERNELS=1`` does).
Triton's ``tl.dot`` runs float32 inputs in TF32, hence the ~1e-2 tolerances even in float32.
Errors are ``max|a - b| / max|b|``. Skipped without CUDA; on CUDA, kernels that do not import fail every test
(only ``RAD_DS_DISABLE_KERNELS=1``, asked for by hand, skips, and not under ``RAD_DS_REQUIRE_KERNELS=1``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from rad_ds.models import Mamba2Mixer, ssm_ops
from rad_ds.models.hybrid_cache import MambaState
from rad_ds.models.ssd_scan import ssd_chunk_scan
from tests.helpers import cuda_with_kernels, tiny_config

pytestmark = pytest.mark.gpu

# scaled max error allowed between the Triton and the torch path
TOL = {torch.float32: 1e-2, torch.bfloat16: 5e-2}
GRAD_TOL = 2e-2  # float32 only


@pytest.fixture
def cuda():
    """Skips without CUDA; with CUDA, kernels that do not import are a failure (``tests.helpers.cuda_with_kernels``)."""
    return cuda_with_kernels()


@contextlib.contextmanager
def torch_path():
    """Run ``ssm_ops`` (scan, step, norm, conv) on the pure-PyTorch path, even on CUDA."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ssm_ops, "_kernels", lambda: None)
        mp.setenv("RAD_DS_DISABLE_KERNELS", "1")  # asked for: without it a CUDA tensor with no kernels is an error
        yield


def assert_scaled_close(actual, expected, tol, what=""):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: scaled error {err:.3e} > {tol:.0e}"


def scan_inputs(device, dtype, length, batch=2, heads=8, headdim=64, d_state=64, groups=2):
    """x, B, C in ``dtype``; dt, A, D and the initial state in float32 (as the mixer passes them)."""
    x = torch.randn(batch, length, heads, headdim)
    dt = F.softplus(torch.randn(batch, length, heads) - 2)
    A = -torch.exp(torch.rand(heads))
    B = torch.randn(batch, length, groups, d_state)
    C = torch.randn(batch, length, groups, d_state)
    D = torch.randn(heads)
    s0 = torch.randn(batch, heads, headdim, d_state)
    return (x.to(device, dtype), dt.to(device), A.to(device), B.to(device, dtype), C.to(device, dtype),
            D.to(device), s0.to(device))


@pytest.mark.parametrize("length", [100, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunk_scan_triton_matches_torch(cuda, dtype, length):
    assert ssm_ops.use_kernels(torch.empty(0, device=cuda))
    inputs = scan_inputs(cuda, dtype, length)
    chunk = 64

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(dtype == torch.float32) for t in inputs]
        x, dt, A, B, C, D, s0 = leaves
        y, final = fn(x, dt, A, B, C, D, s0)
        grads = None
        if dtype == torch.float32:
            gy, gs = torch.randn_like(y), torch.randn_like(final.float())
            ((y * gy).sum() + (final.float() * gs).sum()).backward()
            grads = [t.grad for t in leaves]
        return y, final, grads

    torch.manual_seed(1)
    y_k, s_k, g_k = run(lambda x, dt, A, B, C, D, s0: ssm_ops.chunk_scan(x, dt, A, B, C, D, chunk, initial_states=s0))
    torch.manual_seed(1)  # same gy, gs
    y_t, s_t, g_t = run(lambda x, dt, A, B, C, D, s0: ssd_chunk_scan(
        x, dt, A, B, C, chunk_size=chunk, D=D, initial_states=s0, return_final_states=True))
    assert y_k.dtype == y_t.dtype == dtype
    assert_scaled_close(y_k, y_t, TOL[dtype], "y")
    assert_scaled_close(s_k.float(), s_t, TOL[dtype], "final state")
    if g_k is not None:
        for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "initial_states"), g_k, g_t):
            assert a is not None and b is not None, f"no gradient for {name}"
            assert_scaled_close(a, b, GRAD_TOL, f"d{name}")


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scan_step_triton_matches_torch(cuda, dtype, groups):
    b, h, p, n = 3, 8, 64, 64
    state = torch.randn(b, h, p, n, device=cuda)  # the cache keeps the SSM state in float32
    x = torch.randn(b, h, p, device=cuda, dtype=dtype)
    dt = F.softplus(torch.randn(b, h, device=cuda) - 2)
    A = -torch.exp(torch.rand(h, device=cuda))
    B = torch.randn(b, groups, n, device=cuda, dtype=dtype)
    C = torch.randn(b, groups, n, device=cuda, dtype=dtype)
    D = torch.randn(h, device=cuda)

    s_k = state.clone()
    y_k = ssm_ops.scan_step(s_k, x, dt, A, B, C, D)
    s_t = state.clone()
    with torch_path():
        y_t = ssm_ops.scan_step(s_t, x, dt, A, B, C, D)
    assert y_k.dtype == y_t.dtype == dtype
    assert_scaled_close(y_k, y_t, TOL[dtype], "y")
    assert_scaled_close(s_k, s_t, 1e-5, "state")  # fp32 state, fp32 arithmetic on both sides


@pytest.mark.parametrize("group_size", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_rmsnorm_triton_matches_torch(cuda, dtype, group_size):
    d = 256
    xz = torch.randn(2, 7, 2 * d, device=cuda, dtype=dtype)
    x, z = xz[..., :d], xz[..., d:]  # z a strided view, as the mixer's split gives it
    x = x.contiguous().requires_grad_(dtype == torch.float32)
    z = z.detach().requires_grad_(dtype == torch.float32)
    w = (1 + 0.1 * torch.randn(d, device=cuda)).to(dtype).requires_grad_(dtype == torch.float32)

    out_k = ssm_ops.gated_rmsnorm(x, z, w, 1e-5, group_size)
    out_t = ssm_ops.gated_rmsnorm_ref(x, z, w, 1e-5, group_size)
    assert out_k.dtype == out_t.dtype == dtype
    assert_scaled_close(out_k, out_t, 1e-5 if dtype == torch.float32 else 1e-2, "out")
    if dtype == torch.float32:
        g = torch.randn_like(out_t)
        grads_k = torch.autograd.grad(out_k, (x, z, w), g)
        grads_t = torch.autograd.grad(out_t, (x, z, w), g)
        for name, a, b in zip("xzw", grads_k, grads_t):
            assert_scaled_close(a, b, 1e-4, f"d{name}")


def make_mixer(device, dtype):
    # head_dim = d_state = 64, 4 heads, 2 KV groups: shapes the kernels are tuned for
    cfg = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, mamba_chunk_size=64,
                      mamba_proj_bias=True)
    mixer = Mamba2Mixer(cfg, layer_idx=1)
    with torch.no_grad():
        mixer.D.uniform_(0.5, 1.5)
        mixer.norm.weight.uniform_(0.5, 1.5)
    return mixer.to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixer_triton_matches_torch(cuda, dtype):
    mixer = make_mixer(cuda, dtype)
    hidden = torch.randn(2, 100, mixer.d_model, device=cuda, dtype=dtype)

    # training forward + backward
    def fwd_bwd():
        mixer.zero_grad(set_to_none=True)
        h = hidden.detach().clone().requires_grad_()
        y = mixer(h)
        if dtype == torch.float32:
            torch.manual_seed(2)
            (y * torch.randn_like(y)).sum().backward()
        return y, h.grad, {k: p.grad for k, p in mixer.named_parameters()}

    y_k, dh_k, g_k = fwd_bwd()
    with torch_path():
        y_t, dh_t, g_t = fwd_bwd()
    assert_scaled_close(y_k, y_t, TOL[dtype], "mixer output")
    if dtype == torch.float32:
        assert_scaled_close(dh_k, dh_t, GRAD_TOL, "d hidden")
        for name in g_t:
            assert_scaled_close(g_k[name], g_t[name], GRAD_TOL, f"d {name}")

    # inference: prefill 60 tokens, then decode the rest one token at a time
    @torch.no_grad()
    def prefill_decode(prefix=60, steps=8):
        cache = MambaState()
        outs = [mixer(hidden[:, :prefix], cache=cache)]
        for t in range(prefix, prefix + steps):
            outs.append(mixer(hidden[:, t : t + 1], cache=cache))
        return torch.cat(outs, 1), cache

    y_dk, cache_k = prefill_decode()
    with torch_path():
        y_dt, cache_t = prefill_decode()
    assert_scaled_close(y_dk, y_dt, TOL[dtype], "prefill + decode outputs")
    assert_scaled_close(cache_k.ssm_state, cache_t.ssm_state, TOL[dtype], "ssm state")
    assert_scaled_close(cache_k.conv_state, cache_t.conv_state, TOL[dtype], "conv state")
    # and on the kernel path, decoding agrees with the full forward
    assert_scaled_close(y_dk, y_k[:, : y_dk.size(1)], TOL[dtype], "kernel decode vs kernel forward")


def test_packed_documents_scan_and_conv_match_torch(cuda):
    """seq_idx to mamba_chunk_scan_combined and causal_conv1d_fn vs the torch path's document resets."""
    torch.manual_seed(0)
    length = 300
    x, dt, A, B, C, D, _ = scan_inputs(cuda, torch.float32, length)
    seq = torch.zeros(2, length, dtype=torch.long, device=cuda)
    seq[0, 70:], seq[0, 128:], seq[0, 211:] = 1, 2, 3
    seq[1, 9:] = 1
    got, got_final = ssm_ops.chunk_scan(x, dt, A, B, C, D, 64, seq_idx=seq)
    want, want_final = ssd_chunk_scan(x, dt, A, B, C, 64, D=D, return_final_states=True, seq_idx=seq)
    assert_scaled_close(got, want, TOL[torch.float32], "packed scan y")
    assert_scaled_close(got_final, want_final, TOL[torch.float32], "packed scan final state")
    xc = torch.randn(2, 96, length, device=cuda)
    w, bias = torch.randn(96, 4, device=cuda), torch.randn(96, device=cuda)
    y, state = ssm_ops.causal_conv1d(xc, w, bias, seq_idx=seq)
    with torch_path():
        y_ref, state_ref = ssm_ops.causal_conv1d(xc, w, bias, seq_idx=seq)
    assert_scaled_close(y, y_ref, 1e-4, "packed conv")
    assert_scaled_close(state, state_ref, 0, "packed conv state")


def test_packed_model_on_cuda_equals_documents_alone(cuda):
    from rad_ds.models import RadHybridForCausalLM

    torch.manual_seed(0)
    model = RadHybridForCausalLM(tiny_config()).to(cuda).eval()
    lengths = (37, 64, 27)
    docs = [torch.randint(0, 256, (n,), device=cuda) for n in lengths]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n, device=cuda) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits[0]
        start = 0
        for d in docs:
            assert_scaled_close(packed[start:start + len(d)], model(d[None]).logits[0], TOL[torch.float32],
                                f"document at {start}")
            start += len(d)
