"""The Mamba2 mixer in MambaInLlama's shapes, with mamba-ssm's parameter names.

``d_inner = n_heads * head_dim``, ``d_xb = n_kv_heads * head_dim``, ``d_state = head_dim``;
``in_proj`` rows are ``[z | x | B | C | dt]`` with sizes ``[d_inner, d_xb, d_xb, d_inner, nheads]``.
x and B are repeated over the KV groups (like GQA) before the depthwise causal conv, so that an
attention layer's V, K, Q, O map onto x, B, C, out_proj (Wang et al. 2024, "The Mamba in the Llama").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ssm_ops import causal_conv1d, chunk_scan, conv_step, gated_rmsnorm, scan_step


class Mamba2Mixer(nn.Module):
    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model = config.hidden_size
        self.d_inner = config.mamba_d_inner
        self.d_xb = config.mamba_d_xb
        self.d_state = config.mamba_d_state
        self.headdim = config.mamba_headdim
        self.nheads = self.d_inner // self.headdim
        self.ngroups = self.d_inner // self.d_state
        self.repeat_group = self.d_inner // self.d_xb
        self.d_conv = config.mamba_d_conv
        self.chunk_size = config.mamba_chunk_size
        self.norm_eps = config.rms_norm_eps
        self.dt_min, self.dt_max = config.mamba_dt_min, config.mamba_dt_max
        self.dt_init_floor = config.mamba_dt_init_floor
        self.A_init_range = tuple(config.mamba_A_init_range)
        self.dt_limit = tuple(config.mamba_dt_limit) if config.mamba_dt_limit else None

        d_in_proj = 2 * self.d_inner + 2 * self.d_xb + self.nheads
        self.conv_dim = 3 * self.d_inner
        self.in_proj = nn.Linear(self.d_model, d_in_proj, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=self.d_conv, groups=self.conv_dim,
            padding=self.d_conv - 1, bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, eps=self.norm_eps, group_size=self.d_inner // self.ngroups)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=config.mamba_out_bias)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.reset_ssm_parameters()

    def ssm_init_values(self, generator: torch.Generator | None = None):
        """Mamba2's init of ``dt_bias`` (inverse softplus of log-uniform dt in [dt_min, dt_max]) and
        ``A_log`` (log U[A_init_range]), as fresh float32 CPU tensors."""
        u = torch.rand(self.nheads, generator=generator, dtype=torch.float32)
        dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        a = torch.empty(self.nheads, dtype=torch.float32).uniform_(*self.A_init_range, generator=generator)
        return inv_dt, torch.log(a)

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None):
        """Set ``dt_bias``, ``A_log`` and ``D`` to Mamba2's init. Call it after any generic weight init."""
        dt_bias, a_log = self.ssm_init_values(generator)
        self.dt_bias.copy_(dt_bias.to(self.dt_bias.device, self.dt_bias.dtype))
        self.A_log.copy_(a_log.to(self.A_log.device, self.A_log.dtype))
        self.D.fill_(1.0)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Mamba2's standard init of every parameter (PyTorch defaults for the projections and conv)."""
        for mod in (self.in_proj, self.conv1d, self.out_proj):
            _torch_default_init(mod, generator)
        self.norm.weight.fill_(1.0)
        self.reset_ssm_parameters(generator)

    # -- helpers -------------------------------------------------------------------------------
    def _split_proj(self, zxbcdt):
        z, x, B, C, dt = torch.split(
            zxbcdt, [self.d_inner, self.d_xb, self.d_xb, self.d_inner, self.nheads], dim=-1
        )
        # repeat x and B over the KV groups, exactly as GQA repeats V and K
        if self.repeat_group > 1:
            x = self._repeat(x)
            B = self._repeat(B)
        return z, torch.cat([x, B, C], dim=-1), dt

    def _repeat(self, t):
        n_kv = self.d_xb // self.d_state
        shp = t.shape[:-1]
        t = t.reshape(*shp, n_kv, self.d_state).repeat_interleave(self.repeat_group, dim=-2)
        return t.reshape(*shp, self.d_inner)

    def _dt(self, dt):
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit is not None:
            dt = dt.clamp(*self.dt_limit)
        return dt

    # -- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None):
        """``hidden_states (b, l, d)``. ``cache``: a per-layer state object with ``conv_state`` and
        ``ssm_state`` (``None`` in both = start from zeros); updated in place when given.
        ``attention_mask (b, l)``: 0 marks padding, which contributes nothing to the state.
        ``seq_idx (b, l)``: the document of each position of a packed row; conv and SSM state restart at
        each document, so a document computes what it computes alone."""
        b, l, _ = hidden_states.shape
        if cache is not None and cache.ssm_state is not None and l == 1:
            return self._step(hidden_states, cache, attention_mask)

        z, xBC, dt = self._split_proj(self.in_proj(hidden_states))
        if attention_mask is not None:
            m = attention_mask[:, -l:, None].to(xBC.dtype)
            xBC = xBC * m
        conv_state = cache.conv_state if cache is not None else None
        w = self.conv1d.weight.squeeze(1)
        xBC_t, new_conv = causal_conv1d(xBC.transpose(1, 2), w, self.conv1d.bias, conv_state, seq_idx=seq_idx)
        xBC = xBC_t.transpose(1, 2)
        if attention_mask is not None:
            xBC = xBC * m  # conv bias would otherwise leak into the state at padded positions
        x, B, C = torch.split(xBC, [self.d_inner, self.d_inner, self.d_inner], dim=-1)
        x = x.reshape(b, l, self.nheads, self.headdim)
        B = B.reshape(b, l, self.ngroups, self.d_state)
        C = C.reshape(b, l, self.ngroups, self.d_state)
        A = -torch.exp(self.A_log.float())
        init = cache.ssm_state if cache is not None else None
        y, final = chunk_scan(x, self._dt(dt), A, B, C, self.D, self.chunk_size, initial_states=init, seq_idx=seq_idx)
        if cache is not None:
            # own, contiguous storage: decode steps update both in place (a view of the conv input would
            # also keep the whole prompt's activations alive)
            cache.conv_state = new_conv.detach().clone(memory_format=torch.contiguous_format)
            cache.ssm_state = final.detach().float().contiguous()
        y = y.reshape(b, l, self.d_inner)
        y = self.norm(y, z)
        return self.out_proj(y)

    def _step(self, hidden_states, cache, attention_mask=None):
        b = hidden_states.size(0)
        z, xBC, dt = self._split_proj(self.in_proj(hidden_states[:, 0]))
        w = self.conv1d.weight.squeeze(1)
        if attention_mask is not None:
            m = attention_mask[:, -1:].to(xBC.dtype)
            xBC = xBC * m
        xBC = conv_step(xBC, w, self.conv1d.bias, cache.conv_state)
        if attention_mask is not None:
            xBC = xBC * m
        x, B, C = torch.split(xBC, [self.d_inner, self.d_inner, self.d_inner], dim=-1)
        A = -torch.exp(self.A_log.float())
        y = scan_step(
            cache.ssm_state,
            x.reshape(b, self.nheads, self.headdim),
            self._dt(dt),
            A,
            B.reshape(b, self.ngroups, self.d_state),
            C.reshape(b, self.ngroups, self.d_state),
            self.D,
        )
        y = self.norm(y.reshape(b, 1, self.d_inner), z[:, None])
        return self.out_proj(y)


@torch.no_grad()
def _torch_default_init(mod: nn.Module, generator: torch.Generator | None = None):
    """PyTorch's default init of nn.Linear / nn.Conv1d (kaiming-uniform, a=sqrt(5)), seedable."""
    nn.init.kaiming_uniform_(mod.weight, a=math.sqrt(5), generator=generator)
    if mod.bias is not None:
        fan_in = mod.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(mod.bias, -bound, bound, generator=generator)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x * silu(z)) * weight`` over groups (mamba-ssm's ``RMSNormGated``, norm after gate)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.group_size = group_size or hidden_size

    def forward(self, x, z):
        return gated_rmsnorm(x, z, self.weight, self.eps, self.group_size)
