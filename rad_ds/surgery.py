"""Attention -> Mamba2 surgery: swap the mixer of chosen layers and initialise it.

``init="attention"`` follows MambaInLlama (Wang et al. 2024): the Mamba2 ``in_proj`` rows for x, B, C
take the attention's V, K, Q projections and ``out_proj`` takes O (q/k/v/o biases map the same way);
the z and dt rows, the conv and the norm get Mamba2's standard init, and ``dt_bias`` / ``A_log`` are set
after it. MLPs and layer norms are untouched. ``init="random"`` is the ablation: Mamba2's init only.

Works on a plain model and on a ZeRO-3 partitioned one (the attention weights are gathered first).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rad_ds.models.mamba2_mixer import Mamba2Mixer

INIT_MODES = ("attention", "random")


class SurgeryError(ValueError):
    """A replacement request that cannot be carried out; the message says what to change."""


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
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise SurgeryError(f"--layers: {part!r} is not a layer index; give e.g. --layers 3,7,11") from None
    if not out:
        raise SurgeryError("--layers is empty; give e.g. --layers 3,7,11")
    return out


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
    attn = [i for i, t in enumerate(config.layer_types) if t == "attention"]
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


def _gathered(params):
    """Gather ZeRO-3 partitioned parameters for reading; a no-op for ordinary tensors."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def init_from_attention(mixer: Mamba2Mixer, attn) -> None:
    """MambaInLlama mapping: x <- V, B <- K, C <- Q, out_proj <- O (weights and biases)."""
    di, dxb = mixer.d_inner, mixer.d_xb
    rows = {"x": (di, di + dxb), "B": (di + dxb, di + 2 * dxb), "C": (di + 2 * dxb, 2 * di + 2 * dxb)}
    src = {"x": attn.v_proj, "B": attn.k_proj, "C": attn.q_proj}
    with _gathered(list(attn.parameters())):
        for name, (lo, hi) in rows.items():
            lin = src[name]
            if lin.weight.shape != mixer.in_proj.weight[lo:hi].shape:
                raise SurgeryError(
                    f"layer {mixer.layer_idx}: {name} rows of in_proj are {tuple(mixer.in_proj.weight[lo:hi].shape)} "
                    f"but the attention projection is {tuple(lin.weight.shape)}"
                )
            mixer.in_proj.weight[lo:hi].copy_(lin.weight)
            if mixer.in_proj.bias is not None:
                if lin.bias is not None:
                    mixer.in_proj.bias[lo:hi].copy_(lin.bias)
                else:
                    mixer.in_proj.bias[lo:hi].zero_()
        mixer.out_proj.weight.copy_(attn.o_proj.weight)
        if mixer.out_proj.bias is not None:
            if attn.o_proj.bias is not None:
                mixer.out_proj.bias.copy_(attn.o_proj.bias)
            else:
                mixer.out_proj.bias.zero_()
    if mixer.in_proj.bias is not None:  # z and dt rows: no bias
        mixer.in_proj.bias[:di].zero_()
        mixer.in_proj.bias[2 * di + 2 * dxb:].zero_()


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
    new_types = list(config.layer_types)
    for i in layers:
        new_types[i] = "mamba2"
    config.layer_types = new_types
    for i in layers:
        block = model.model.layers[i]
        attn = block.self_attn
        ref = next(iter(attn.parameters()))
        dtype = ref.dtype if ref.numel() > 0 else next(block.mlp.parameters()).dtype
        mixer = Mamba2Mixer(config, layer_idx=i)
        mixer.reset_parameters(generator=gen)
        if init == "attention":
            init_from_attention(mixer, attn)
        mixer.to(device=ref.device if ref.device.type != "meta" else "cpu", dtype=dtype)
        del block.self_attn
        block.mamba = mixer
        block.layer_type = "mamba2"
    prev = dict(config.replaced_layers or {})
    all_layers = sorted(set(prev.get("layers", [])) | set(layers))
    record = ReplacementRecord(
        layers=all_layers, init=init, source=getattr(config, "name_or_path", None) or None, seed=seed,
        selection=dict(selection or {}),
    )
    config.replaced_layers = record.to_dict()
    return record


def layers_from_report(report_path: str | Path, k: int, model_config=None) -> tuple[list[int], dict]:
    """The selected layers for ``k`` in a diagnosis report (``report.json``), with provenance.

    Refuses a report made for a different model (layer count or attention layout differ)."""
    p = Path(report_path)
    try:
        report = json.loads(p.read_text())
    except FileNotFoundError:
        raise SurgeryError(f"--report {p}: file not found") from None
    except json.JSONDecodeError as e:
        raise SurgeryError(f"--report {p}: not valid JSON ({e})") from None
    sels = report.get("selections")
    if not isinstance(sels, list) or not sels:
        raise SurgeryError(f"--report {p}: no 'selections' list; is this a rad-ds diagnosis report?")
    by_k = {int(s["k"]): s for s in sels if "k" in s}
    if k not in by_k:
        raise SurgeryError(f"--report {p}: no selection for k={k}; available k: {sorted(by_k)}")
    if model_config is not None:
        rep_layers = report.get("layers") or []
        attn = [i for i, t in enumerate(model_config.layer_types) if t == "attention"]
        rep_attn = [int(x["index"]) for x in rep_layers if x.get("type", "attention") == "attention"]
        n_rep = report.get("num_hidden_layers")
        if (n_rep is not None and int(n_rep) != model_config.num_hidden_layers) or (rep_attn and rep_attn != attn):
            raise SurgeryError(
                f"--report {p} was made for model {report.get('model')!r} with attention layers {rep_attn}; "
                f"this model has attention layers {attn}. Diagnose this model, or pass the matching report"
            )
    layers = [int(i) for i in by_k[k]["layers"]]
    return layers, {"report": str(p), "k": k, "report_model": report.get("model")}


def build_student(
    model_path: str,
    out_dir: str | Path,
    layers: list[int] | None = None,
    report: str | Path | None = None,
    k: int | None = None,
    gguf_file: str | None = None,
    init: str = "attention",
    allow_all: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> ReplacementRecord:
    """Load a base model, replace the chosen layers and write the student checkpoint to ``out_dir``
    (safetensors, config with ``replaced_layers``, tokenizer, model code, ``replacement.json``).

    Every check runs before anything is written; the directory appears complete or not at all."""
    from rad_ds.models.conversion import load_model, save_model

    out = Path(out_dir)
    if (layers is None) == (report is None):
        raise SurgeryError("give either --layers or --report with --k")
    if report is not None and k is None:
        raise SurgeryError("--report needs --k (the number of layers to replace)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SurgeryError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite")
    if init not in INIT_MODES:
        raise SurgeryError(f"--init {init!r}: use one of {list(INIT_MODES)}")
    model, tok = load_model(model_path, gguf_file=gguf_file, dtype=dtype)
    selection = {}
    if report is not None:
        layers, selection = layers_from_report(report, int(k), model.config)
    check_layers(model.config, layers, allow_all=allow_all)
    record = replace_attention(model, layers, init=init, allow_all=allow_all, seed=seed, selection=selection)
    record.source = str(model_path) if gguf_file is None else f"{model_path}/{gguf_file}"
    model.config.replaced_layers = record.to_dict()
    save_model(model, tok, out, extra_files={"replacement.json": record.to_dict()})
    return record
