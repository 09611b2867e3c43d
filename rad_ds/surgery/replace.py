"""Attention -> Mamba2 surgery: swap the mixer of chosen layers and initialise it.

``init="attention"`` follows MambaInLlama (Wang et al. 2024): the Mamba2 ``in_proj`` rows for x, B, C
take the attention's V, K, Q projections and ``out_proj`` takes O (q/k/v/o biases map the same way);
the z and dt rows, the conv and the norm get Mamba2's standard init (a family may transform the x/B/C
sources: Qwen3 folds its q/k norms in, ``rad_ds.models.families.qwen3``), and ``dt_bias`` / ``A_log`` are set
after it. MLPs and layer norms are untouched. ``init="random"`` is the ablation: Mamba2's init only.

Works on a plain model and on a ZeRO-3 partitioned one (the attention weights are gathered first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from rad_ds.core.layers import attention_layers, parse_int_list
from rad_ds.core.report import DiagnosisReport, ReportError
from rad_ds.models.families import family_of
from rad_ds.models.mamba2_mixer import Mamba2Mixer

from .init import INIT_MODES, SurgeryError, init_from_attention


@dataclass
class ReplacementRecord:
    """What surgery did; stored in ``config.replaced_layers`` and next to the student."""

    layers: list[int]
    init: str
    source: str | None = None
    seed: int = 0
    selection: dict = field(default_factory=dict)  # provenance, e.g. {"report": path, "k": 4}

    def to_dict(self) -> dict:
        return asdict(self)


def parse_layers(text: str) -> list[int]:
    """'3,7,11' -> [3, 7, 11]; ranges like '4-6' are accepted."""
    return parse_int_list(text, "--layers", SurgeryError, noun="a layer index")


def check_layers(config, layers, allow_all: bool = False) -> list[int]:
    """Validate a replacement request against a config; returns the sorted indices."""
    n = config.num_hidden_layers
    dup = sorted({i for i in layers if list(layers).count(i) > 1})
    if dup:
        raise SurgeryError(f"layer index(es) {dup} given more than once; list each layer once")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise SurgeryError(f"layer index(es) {bad} out of range: the model has {n} layers (0..{n - 1})")
    already = [i for i in layers if config.layer_types[i] == "mamba2"]
    if already:
        raise SurgeryError(f"layer(s) {already} are already mamba2; only attention layers can be replaced")
    attn = attention_layers(config)
    if set(attn) <= set(layers) and not allow_all:
        raise SurgeryError(
            f"this would replace every attention layer ({len(attn)}); pass --allow-all (allow_all=True) if intended"
        )
    if config.mamba_d_state != config.head_dim or config.mamba_d_inner != config.num_attention_heads * config.head_dim:
        raise SurgeryError(
            "attention init needs MambaInLlama shapes (mamba_d_state == head_dim, mamba_d_inner == heads*head_dim); "
            f"got d_state={config.mamba_d_state}, head_dim={config.head_dim}, d_inner={config.mamba_d_inner}"
        )
    return sorted(layers)


def mark_replaced(config, layers, init: str, seed: int = 0, selection: dict | None = None) -> ReplacementRecord:
    """Switch ``layers`` of ``config`` to mamba2 and record the replacement in ``config.replaced_layers``."""
    new_types = list(config.layer_types)
    for i in layers:
        new_types[i] = "mamba2"
    config.layer_types = new_types
    prev = dict(config.replaced_layers or {})
    all_layers = sorted(set(prev.get("layers", [])) | set(layers))
    record = ReplacementRecord(
        layers=all_layers, init=init, source=getattr(config, "name_or_path", None) or None, seed=seed,
        selection=dict(selection or {}),
    )
    config.replaced_layers = record.to_dict()
    return record


def new_mixer(config, i: int, attn, init: str, generator: torch.Generator, dtype=None) -> Mamba2Mixer:
    """The Mamba2 mixer replacing layer ``i``'s attention ``attn``: Mamba2's init drawn from ``generator``
    (call in layer order for a reproducible student), then the MambaInLlama mapping for ``init="attention"``;
    ``"attention_skip"`` is that mapping with ``out_proj`` zeroed: the new mixer starts as a skipped sublayer (the
    block's output is its input plus the MLP's) and grows in as ``out_proj`` learns (as LoRA's zero B)."""
    mixer = Mamba2Mixer(config, layer_idx=i)
    mixer.reset_parameters(generator=generator)
    if init in ("attention", "attention_skip"):
        init_from_attention(mixer, attn, family_of(config))
    if init == "attention_skip":
        with torch.no_grad():
            mixer.out_proj.weight.zero_()
            if mixer.out_proj.bias is not None:
                mixer.out_proj.bias.zero_()
    return mixer.to(dtype=dtype) if dtype is not None else mixer


def replace_attention(
    model,
    layers,
    init: str = "attention",
    allow_all: bool = False,
    seed: int = 0,
    selection: dict | None = None,
) -> ReplacementRecord:
    """Replace the attention mixer of ``layers`` by Mamba2 in place; returns the record.

    ``model`` is a ``RadHybridForCausalLM`` (import other checkpoints with ``rad_ds.models.conversion``).
    Untouched layers keep their parameter tensors as they are."""
    if init not in INIT_MODES:
        raise SurgeryError(f"init={init!r}: use one of {list(INIT_MODES)}")
    config = model.config
    layers = check_layers(config, list(layers), allow_all=allow_all)
    gen = torch.Generator().manual_seed(seed)
    record = mark_replaced(config, layers, init, seed, selection)
    for i in layers:
        block = model.model.layers[i]
        attn = block.self_attn
        ref = next(iter(attn.parameters()))
        dtype = ref.dtype if ref.numel() > 0 else next(block.mlp.parameters()).dtype
        mixer = new_mixer(config, i, attn, init, gen, dtype)
        mixer.to(device=ref.device if ref.device.type != "meta" else "cpu")
        del block.self_attn
        block.mamba = mixer
        block.layer_type = "mamba2"
    return record


def layers_from_report(report_path, k: int, model_config=None, what: str = "--report") -> tuple[list[int], dict]:
    """The selected layers for ``k`` in a diagnosis report (``report.json``), with provenance.

    Refuses a report made for a different model (layer count or attention layout differ)."""
    try:
        report = DiagnosisReport.load(report_path, what)
        if model_config is not None:
            report.check(model_config)
        return list(report.selection(k).layers), report.provenance(k)
    except ReportError as e:
        raise SurgeryError(str(e)) from None


__all__ = ["ReplacementRecord", "check_layers", "layers_from_report", "mark_replaced", "new_mixer", "parse_layers",
           "replace_attention"]
