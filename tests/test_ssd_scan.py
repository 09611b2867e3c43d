"""The pure-PyTorch SSD scan and the Mamba2 mixer against step-by-step recurrences and mamba-ssm's references.

Reference = ``ssd_scan_ref`` (the plain recurrence ``S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T``,
``y_t = S_t C_t + D x_t``) run in float64. Errors are measured as ``max|a - b| / max|b|`` (scaled to the
tensor's magnitude, so one tolerance fits outputs, states and every gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rad_ds.models import Mamba2Mixer, ssm_ops
from rad_ds.models.hybrid_cache import MambaState
from rad_ds.models.ssd_scan import ssd_chunk_scan, ssd_scan_ref, ssd_step
from tests.helpers import mamba_ref, tiny_config

# max |a - b| / max |b|; measured errors are ~1e-7 (fp32) and ~1e-15 (fp64), so these leave >= 10x margin
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}

BATCH, HEADS, HEADDIM, DSTATE = 2, 4, 8, 16


def assert_scaled_close(actual, expected, tol, what=""):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: scaled error {err:.3e} > {tol:.0e}"


def scan_inputs(length, groups=2, heads=HEADS, init=True, dtype=torch.float64, dt_shift=-1.0, batch=BATCH):
    """x, dt, A, B, C, D, initial_states in ``dtype`` (dt > 0, A < 0, as the mixer feeds them)."""
    x = torch.randn(batch, length, heads, HEADDIM, dtype=torch.float64)
    dt = F.softplus(torch.randn(batch, length, heads, dtype=torch.float64) + dt_shift)
    A = -torch.exp(torch.rand(heads, dtype=torch.float64))
    B = torch.randn(batch, length, groups, DSTATE, dtype=torch.float64)
    C = torch.randn(batch, length, groups, DSTATE, dtype=torch.float64)
    D = torch.randn(heads, dtype=torch.float64)
    s0 = torch.randn(batch, heads, HEADDIM, DSTATE, dtype=torch.float64) if init else None
    return [None if t is None else t.to(dtype) for t in (x, dt, A, B, C, D, s0)]


def run_with_grads(fn, inputs, gy, gs):
    """Outputs, final state and the gradients of ``<y, gy> + <final, gs>`` w.r.t. every input."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    x, dt, A, B, C, D, s0 = leaves
    y, final = fn(x, dt, A, B, C, D=D, initial_states=s0, return_final_states=True)
    loss = (y.double() * gy).sum() + (final.double() * gs).sum()
    loss.backward()
    return y, final, [None if t is None else t.grad for t in leaves]


GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_states")


# -- chunked scan vs the float64 recurrence ------------------------------------------------------


@pytest.mark.parametrize("init", [False, True], ids=["zero_init", "with_init"])
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("length", [1, 7, 64, 100])
def test_chunk_scan_matches_recurrence(length, chunk, init):
    inputs = scan_inputs(length, groups=2, init=init)
    gy = torch.randn(BATCH, length, HEADS, HEADDIM, dtype=torch.float64)
    gs = torch.randn(BATCH, HEADS, HEADDIM, DSTATE, dtype=torch.float64)
    y_ref, s_ref, g_ref = run_with_grads(ssd_scan_ref, inputs, gy, gs)

    def chunked(*a, **k):
        return ssd_chunk_scan(*a, chunk_size=chunk, **k)

    for dtype in (torch.float32, torch.float64):
        y, s, grads = run_with_grads(chunked, [None if t is None else t.to(dtype) for t in inputs], gy, gs)
        assert y.dtype == dtype
        tol = TOL[dtype]
        assert_scaled_close(y, y_ref, tol, f"{dtype} y")
        assert_scaled_close(s, s_ref, tol, f"{dtype} final state")
        for name, g, gr in zip(GRAD_NAMES, grads, g_ref):
            if gr is None:
                assert g is None
                continue
            assert g.dtype == dtype
            assert_scaled_close(g, gr, tol, f"{dtype} d{name}")


@pytest.mark.parametrize("groups", [1, 4])
def test_chunk_scan_groups(groups):
    """One B/C group shared by all heads (g=1) and one per head (g=h)."""
    inputs = scan_inputs(37, groups=groups)
    y_ref, s_ref = ssd_scan_ref(*inputs[:5], D=inputs[5], initial_states=inputs[6], return_final_states=True)
    y, s = ssd_chunk_scan(*inputs[:5], chunk_size=16, D=inputs[5], initial_states=inputs[6], return_final_states=True)
    assert_scaled_close(y, y_ref, TOL[torch.float64], "y")
    assert_scaled_close(s, s_ref, TOL[torch.float64], "final state")


def test_chunk_scan_low_precision_inputs():
    """bf16 inputs are computed in float32 and returned in bf16."""
    inputs = [t.to(torch.bfloat16) for t in scan_inputs(50)]
    y, s = ssd_chunk_scan(*inputs[:5], chunk_size=16, D=inputs[5], initial_states=inputs[6], return_final_states=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref = [t.double() for t in inputs]
    y_ref, s_ref = ssd_scan_ref(*ref[:5], D=ref[5], initial_states=ref[6], return_final_states=True)
    assert_scaled_close(y, y_ref, TOL[torch.bfloat16], "y")
    assert_scaled_close(s, s_ref, 1e-5, "final state")  # fp32 arithmetic on bf16-exact inputs


def test_chunk_scan_strong_decay_is_finite():
    """Large dt * |A| underflows exp(segsum) to 0; no inf/nan may reach outputs or gradients."""
    inputs = scan_inputs(96, dtype=torch.float32, dt_shift=3.0)
    inputs[2] = inputs[2] * 16
    gy = torch.randn(BATCH, 96, HEADS, HEADDIM, dtype=torch.float64)
    gs = torch.randn(BATCH, HEADS, HEADDIM, DSTATE, dtype=torch.float64)
    y, s, grads = run_with_grads(lambda *a, **k: ssd_chunk_scan(*a, chunk_size=32, **k), inputs, gy, gs)
    y_ref, s_ref, g_ref = run_with_grads(ssd_scan_ref, [t.double() for t in inputs], gy, gs)
    assert_scaled_close(y, y_ref, TOL[torch.float32], "y")
    assert_scaled_close(s, s_ref, TOL[torch.float32], "final state")
    for name, g, gr in zip(GRAD_NAMES, grads, g_ref):
        assert_scaled_close(g, gr, TOL[torch.float32], f"d{name}")


@pytest.mark.parametrize("split", [1, 37, 64, 99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_carry(split, dtype):
    """Scanning in two pieces, passing the final state of the first as the initial state of the second,
    equals one scan over the whole sequence."""
    x, dt, A, B, C, D, s0 = scan_inputs(100, dtype=dtype)
    y, s = ssd_chunk_scan(x, dt, A, B, C, chunk_size=16, D=D, initial_states=s0, return_final_states=True)
    y1, s1 = ssd_chunk_scan(
        x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], chunk_size=16, D=D, initial_states=s0,
        return_final_states=True,
    )
    y2, s2 = ssd_chunk_scan(
        x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], chunk_size=16, D=D, initial_states=s1,
        return_final_states=True,
    )
    assert_scaled_close(torch.cat([y1, y2], dim=1), y, TOL[dtype], "y")
    assert_scaled_close(s2, s, TOL[dtype], "final state")


# -- against mamba-ssm's own references ----------------------------------------------------------


@pytest.mark.parametrize("init", [False, True], ids=["zero_init", "with_init"])
@pytest.mark.parametrize("block_len", [16, 32])
def test_matches_ssd_minimal_discrete(block_len, init):
    """mamba-ssm's Listing-1 ``ssd_minimal_discrete(X, A, B, C, block_len, initial_states)`` takes the
    discretised inputs: ``X = x * dt``, ``A = A * dt (b, l, h)``, per-head ``B, C (b, l, h, n)``,
    ``initial_states (b, 1, h, p, n)``; no D; length a multiple of ``block_len``."""
    ref = mamba_ref("ssd_minimal_discrete")
    x, dt, A, B, C, D, s0 = scan_inputs(64, groups=2, init=init)
    rep = HEADS // B.size(2)
    Y, final = ref.ssd_minimal_discrete(
        x * dt[..., None],
        A[None, None, :] * dt,
        B.repeat_interleave(rep, dim=2),
        C.repeat_interleave(rep, dim=2),
        block_len,
        initial_states=None if s0 is None else s0[:, None],
    )
    # a different chunk size on our side: the two must agree whatever the chunking
    y, s = ssd_chunk_scan(x, dt, A, B, C, chunk_size=16, initial_states=s0, return_final_states=True)
    assert_scaled_close(y, Y, TOL[torch.float64], "y")
    assert_scaled_close(s, final, TOL[torch.float64], "final state")


def test_matches_ssd_chunk_scan_combined_ref():
    """mamba-ssm's ``ssd_chunk_scan_combined_ref`` (pure torch, no initial state, length a multiple of
    the chunk size; it takes dt in float32 whatever the input dtype)."""
    ref = mamba_ref("ssd_chunk_scan_combined_ref")
    x, dt, A, B, C, D, _ = scan_inputs(64, groups=2, init=False, dtype=torch.float32)
    out = ref.ssd_chunk_scan_combined_ref(x, dt, A, B, C, 16, D=D)
    y = ssd_chunk_scan(x, dt, A, B, C, chunk_size=16, D=D)
    assert_scaled_close(y, out, TOL[torch.float32], "y")
    y_ref = ssd_scan_ref(*(t.double() for t in (x, dt, A, B, C)), D=D.double())
    assert_scaled_close(out, y_ref, TOL[torch.float32], "mamba-ssm ref vs recurrence")


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_scan_step_matches_selective_state_update_ref(groups):
    """The torch decode step equals mamba-ssm's ``selective_state_update_ref`` given per-(head, dim)
    dt ``(b, h, p)``, A ``(h, p, n)``, D ``(h, p)`` and ``dt_softplus=False``."""
    ref = mamba_ref("selective_state_update_ref")
    b, h, p, n = BATCH, HEADS, HEADDIM, DSTATE
    state = torch.randn(b, h, p, n)
    x = torch.randn(b, h, p)
    dt = F.softplus(torch.randn(b, h) - 1)
    A = -torch.exp(torch.rand(h))
    B, C = torch.randn(b, groups, n), torch.randn(b, groups, n)
    D = torch.randn(h)

    ours_state = state.clone()
    y = ssm_ops.scan_step(ours_state, x, dt, A, B, C, D)
    ref_state = state.clone()
    y_ref = ref.selective_state_update_ref(
        ref_state, x, dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n), B, C,
        D=D[:, None].expand(h, p), dt_softplus=False,
    )
    assert_scaled_close(y, y_ref, 1e-6, "y")
    assert_scaled_close(ours_state, ref_state, 1e-6, "state")
    # and one step of the scan is the scan of one token
    y1, s1 = ssd_chunk_scan(x[:, None], dt[:, None], A, B[:, None], C[:, None], chunk_size=16, D=D,
                            initial_states=state, return_final_states=True)
    assert_scaled_close(y1[:, 0], y, 1e-6, "scan of one token")
    assert_scaled_close(s1, ours_state, 1e-6, "state after one token")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [16, 64])
def test_gated_rmsnorm_matches_rms_norm_ref(group_size, dtype):
    """``rmsnorm(x * silu(z)) * w`` per group == mamba-ssm's ``rms_norm_ref(z=z, norm_before_gate=False)``."""
    ref = mamba_ref("rms_norm_ref")
    x, z = torch.randn(2, 5, 64, dtype=dtype), torch.randn(2, 5, 64, dtype=dtype)
    w = (1 + 0.1 * torch.randn(64)).to(dtype)
    ours = ssm_ops.gated_rmsnorm_ref(x, z, w, 1e-5, group_size)
    theirs = ref.rms_norm_ref(x, w, None, z=z, eps=1e-5, group_size=group_size, norm_before_gate=False)
    assert ours.dtype == theirs.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    else:  # both compute in fp32 and round once; allow one bf16 ulp
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2)


# -- the mixer: decode, prefill + decode, left padding ------------------------------------------


def make_mixer(**overrides):
    cfg = tiny_config(**overrides)
    mixer = Mamba2Mixer(cfg, layer_idx=1).eval()
    with torch.no_grad():  # non-trivial (but stable) SSM parameters
        mixer.D.uniform_(0.5, 1.5)
        mixer.norm.weight.uniform_(0.5, 1.5)
    return mixer


def decode(mixer, hidden, cache, mask=None):
    """Feed ``hidden`` one token at a time; ``mask`` (b, prefix + l) covers everything seen so far."""
    outs = []
    start = 0 if mask is None else mask.size(1) - hidden.size(1)
    for t in range(hidden.size(1)):
        m = None if mask is None else mask[:, : start + t + 1]
        outs.append(mixer(hidden[:, t : t + 1], cache=cache, attention_mask=m))
    return torch.cat(outs, dim=1)


MIXER_TOL = 1e-5


@torch.no_grad()
def test_mixer_decode_matches_forward():
    mixer = make_mixer()
    assert mixer.nheads == 4 and mixer.repeat_group == 2
    hidden = torch.randn(2, 21, mixer.d_model)  # longer than one chunk (16), not a multiple of it
    full_cache = MambaState()
    y_full = mixer(hidden, cache=full_cache)
    assert torch.allclose(y_full, mixer(hidden))  # the cache does not change the forward

    cache = MambaState()
    y_steps = decode(mixer, hidden, cache)
    assert_scaled_close(y_steps, y_full, MIXER_TOL, "token-by-token outputs")
    assert_scaled_close(cache.ssm_state, full_cache.ssm_state, MIXER_TOL, "ssm state")
    assert_scaled_close(cache.conv_state, full_cache.conv_state, MIXER_TOL, "conv state")


@pytest.mark.parametrize("prefix", [2, 16, 19])
@torch.no_grad()
def test_mixer_prefill_then_decode(prefix):
    mixer = make_mixer()
    hidden = torch.randn(2, 24, mixer.d_model)
    y_full = mixer(hidden)

    cache = MambaState()
    y_pre = mixer(hidden[:, :prefix], cache=cache)
    y_dec = decode(mixer, hidden[:, prefix:], cache)
    assert_scaled_close(torch.cat([y_pre, y_dec], 1), y_full, MIXER_TOL, "prefill + decode")

    # prefill in two pieces (the second one continues from the cached conv and SSM state)
    cache = MambaState()
    y_a = mixer(hidden[:, :prefix], cache=cache)
    y_b = mixer(hidden[:, prefix:], cache=cache)
    assert_scaled_close(torch.cat([y_a, y_b], 1), y_full, MIXER_TOL, "chunked prefill")


@torch.no_grad()
def test_mixer_left_padding():
    """A left-padded row gives the unpadded row's outputs at its real positions, the same state, and
    the same decode continuation. Projection and conv biases make the padded positions non-zero
    before masking, so this checks that the mask (not luck) keeps them out of the state."""
    mixer = make_mixer(mamba_proj_bias=True, mamba_conv_bias=True)
    assert mixer.in_proj.bias is not None and mixer.conv1d.bias is not None
    with torch.no_grad():
        mixer.in_proj.bias.normal_()
        mixer.conv1d.bias.normal_()
    d, real, pad = mixer.d_model, 13, 5
    seqs = [torch.randn(1, real, d), torch.randn(1, real + pad, d)]  # row 0 is padded, row 1 is not
    junk = 3 * torch.randn(1, pad, d)
    batch = torch.cat([torch.cat([junk, seqs[0]], 1), seqs[1]], 0)
    mask = torch.ones(2, real + pad, dtype=torch.long)
    mask[0, :pad] = 0
    nxt = torch.randn(2, 4, d)  # tokens decoded after the prompt

    cache = MambaState()
    y = mixer(batch, cache=cache, attention_mask=mask)
    ssm_state, conv_state = cache.ssm_state.clone(), cache.conv_state.clone()
    y_dec = decode(mixer, nxt, cache, mask=torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1))

    for row, seq in enumerate(seqs):
        c = MambaState()
        y_ref = mixer(seq, cache=c)
        n = seq.size(1)
        assert_scaled_close(y[row : row + 1, -n:], y_ref, MIXER_TOL, f"row {row} outputs")
        assert_scaled_close(ssm_state[row : row + 1], c.ssm_state, MIXER_TOL, f"row {row} ssm state")
        assert_scaled_close(conv_state[row : row + 1], c.conv_state, MIXER_TOL, f"row {row} conv state")
        y_dec_ref = decode(mixer, nxt[row : row + 1], c)
        assert_scaled_close(y_dec[row : row + 1], y_dec_ref, MIXER_TOL, f"row {row} decode")
    # without the mask, the junk would change row 0
    y_nomask = mixer(batch)
    assert (y_nomask[0, -real:] - y[0, -real:]).abs().max() > 1e-3


def test_ssd_step_shapes():
    """``ssd_step`` is the recurrence the reference scan is built from: one step from zero is dt x B^T."""
    b, h, p, n = 2, 3, 4, 5
    x, dt, A, B = torch.randn(b, h, p), torch.rand(b, h), -torch.rand(h), torch.randn(b, h, n)
    s = ssd_step(torch.zeros(b, h, p, n), x, dt, A, B)
    torch.testing.assert_close(s, dt[..., None, None] * x[..., None] * B[:, :, None, :])


def test_no_silent_slow_path_on_cuda(monkeypatch):
    """A CUDA tensor without importable kernels is an error naming the fix, unless the torch path is asked
    for; CPU tensors always take the torch path."""
    import types

    from rad_ds.models import ssm_ops

    fake_cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(ssm_ops, "_kernels", lambda: None)
    monkeypatch.setattr(ssm_ops, "_WHY_NOT", ["mamba_ssm not installed"])
    monkeypatch.delenv("RAD_DS_DISABLE_KERNELS", raising=False)
    fix = r"mamba_ssm not installed.*mamba-ssm==2\.3\.2\.post1.*RAD_DS_DISABLE_KERNELS=1"
    with pytest.raises(RuntimeError, match=fix):
        ssm_ops.use_kernels(fake_cuda)
    monkeypatch.setenv("RAD_DS_DISABLE_KERNELS", "1")
    assert ssm_ops.use_kernels(fake_cuda) is False
    assert ssm_ops.use_kernels(torch.zeros(1)) is False
