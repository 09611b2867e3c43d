"""The run config of a distillation: one typed dataclass tree, loaded from YAML/JSON, overridden from
the command line with dotted names (``--train.steps=200``, ``--loss.kd reverse_kl``), validated up front.

Every field holds a simple type (str, int, float, bool, list of int/float, or None) so the tree
round-trips through JSON and is stored in every checkpoint. Field help (``metadata["help"]``) feeds
``--help``. DeepSpeed's own settings stay in DeepSpeed's JSON format (``deepspeed`` names the file);
the values rad-ds derives (batch sizes, clipping, precision) are filled into its ``"auto"`` entries.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "none")
HIDDEN_KINDS = ("mse", "cosine", "none")
VOCAB_MODES = ("strict", "truncate")
TRAINABLE = ("mamba", "mamba_mlp", "replaced", "all")
PACKING = ("greedy", "none")
DATA_FORMATS = ("auto", "json", "parquet", "text", "hub")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
INIT_MODES = ("attention", "random")


class ConfigError(ValueError):
    """A run config that cannot run; the message names the field (or file) and what to do."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    path: str = _f("embedded:smollm2", "base model (HF dir, .gguf, embedded:smollm2) or a student checkpoint")
    gguf_file: str | None = _f(None, "GGUF file name inside model.path")
    dtype: str = _f("float32", f"weights and compute dtype: {', '.join(DTYPES)}")


@dataclass
class TeacherConfig:
    path: str | None = _f(None, "teacher model; default: the base model itself (self-distillation)")
    gguf_file: str | None = _f(None, "GGUF file name inside teacher.path")
    offload: bool = _f(False, "offload the teacher's ZeRO-3 parameters to CPU memory")
    deepspeed: str = _f("ds_configs/zero3_teacher.json", "DeepSpeed config of the teacher engine")


@dataclass
class StudentConfig:
    layers: list[int] | None = _f(None, "attention layers to replace with Mamba2, e.g. 22,25 or 4-6")
    report: str | None = _f(None, "diagnosis report.json to take the layers from (with student.k)")
    k: int | None = _f(None, "with student.report: how many layers to replace")
    init: str = _f("attention", "Mamba2 init: attention (MambaInLlama mapping) or random")
    seed: int = _f(0, "seed of the Mamba2 init")
    allow_all: bool = _f(False, "allow replacing every attention layer")
    trainable: str = _f(
        "mamba",
        "what trains: mamba (new mixers only, RAD), mamba_mlp (+ MLPs of replaced layers), "
        "replaced (whole replaced layers), all",
    )
    gradient_checkpointing: bool = _f(False, "recompute student activations in backward")


@dataclass
class DataConfig:
    path: str | None = _f(None, "jsonl/json/parquet/txt file, a directory of them, or a hub dataset name")
    format: str = _f("auto", f"{', '.join(DATA_FORMATS)} (auto: from the file suffix)")
    split: str = _f("train", "split of a hub dataset")
    text_field: str = _f("text", "field holding plain text")
    messages_field: str = _f("messages", "field holding chat messages [{role, content}, ...]")
    seq_len: int = _f(512, "tokens per packed sequence")
    packing: str = _f("greedy", "greedy: whole documents best-fit into rows; none: one document per row")
    mask_prompt: bool = _f(True, "chat data: logit losses only on assistant tokens")
    add_eos: bool = _f(True, "append EOS to plain-text documents")
    max_documents: int | None = _f(None, "use at most this many documents")
    min_tokens: int = _f(2, "drop documents with fewer tokens (after templating)")
    shuffle: bool = _f(True, "shuffle rows each epoch (seeded by train.seed and the epoch)")


@dataclass
class LossConfig:
    kd: str = _f("forward_kl", f"logit distillation: {', '.join(KD_KINDS)}")
    kd_weight: float = _f(1.0, "weight of the logit loss")
    temperature: float = _f(1.0, "softmax temperature of the logit loss (the loss is scaled by T^2)")
    jsd_beta: float = _f(0.5, "JSD mixture weight: M = beta*teacher + (1-beta)*student")
    hidden: str = _f("mse", f"replaced-layer output loss: {', '.join(HIDDEN_KINDS)}")
    hidden_weight: float = _f(0.0, "weight of the replaced-layer loss (0 = off)")
    layerwise: bool = _f(
        False, "each replaced student layer gets the teacher's input to that layer (MOHAWK-style stage)"
    )
    ce_weight: float = _f(0.0, "weight of cross-entropy on the data (0 = off)")
    chunk_tokens: int = _f(1024, "tokens per chunk when computing the logit losses (bounds memory)")
    vocab: str = _f("strict", "strict: teacher and student vocab sizes must match; truncate: compare the "
                    "tokenizer's tokens when one vocab is a padded version of the other")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list[float] = _f([0.9, 0.95], "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    schedule: str = _f("cosine", f"learning-rate schedule after warmup: {', '.join(SCHEDULES)}")
    warmup_steps: int = _f(0, "linear warmup steps")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of optim.lr")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0 = off)")


@dataclass
class TrainConfig:
    steps: int = _f(100, "optimizer steps")
    micro_batch: int = _f(1, "sequences per rank per forward")
    grad_accum: int | None = _f(None, "micro-batches per step and rank (default: from global_batch, else 1)")
    global_batch: int | None = _f(None, "sequences per optimizer step (= micro_batch x grad_accum x world)")
    seed: int = _f(0, "seed of data order, init and RNG")
    stop_after: int | None = _f(None, "stop (with a checkpoint) after this many steps in this invocation; "
                                      "for time-limited jobs, continue with --resume auto")
    dist_timeout_s: int = _f(600, "timeout of every collective (a dead rank ends the job, no hang)")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "save every N steps (0: only at the end)")
    keep: int = _f(2, "keep the last K complete checkpoints")
    resume: str | None = _f(None, "auto (latest complete checkpoint in out/checkpoints, or fresh) or a path")
    export_final: bool = _f(True, "write out/final (HF directory) at the end")


@dataclass
class LogConfig:
    wandb: bool = _f(True, "log to Weights & Biases (offline unless WANDB_MODE says otherwise)")
    project: str = _f("rad-ds", "wandb project")
    run_name: str | None = _f(None, "wandb run name (default: the out directory's name)")
    progress: bool = _f(True, "tqdm progress bar on rank 0")


@dataclass
class RunConfig:
    out: str | None = _f(None, "run directory: checkpoints/, final/, metrics.jsonl")
    deepspeed: str = _f("ds_configs/zero3.json", "DeepSpeed config of the student engine")
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> RunConfig:
        cfg = cls()
        for key, value in _flatten(data).items():
            cfg.set(key, value, source=source)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(load_file(resolve_shipped(path)), source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # -- access by dotted name -------------------------------------------------------------------
    def set(self, key: str, value: Any, source: str = "override") -> None:
        """Set ``a.b`` to ``value`` (a string from the command line is parsed by the field's type)."""
        obj, name, tp = _resolve(self, key, source)
        setattr(obj, name, _coerce(value, tp, f"{source}: {key}"))

    def get(self, key: str) -> Any:
        obj, name, _ = _resolve(self, key, "config")
        return getattr(obj, name)

    def apply_overrides(self, overrides: list[str]) -> RunConfig:
        """``["--train.steps=10", "--loss.kd", "jsd", ...]`` -> set each field; unknown names fail."""
        for key, value in parse_overrides(overrides):
            self.set(key, value, source="command line")
        return self

    # -- checks ----------------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        """Fail early, naming the field and the fix, on anything that cannot run."""
        _choice("model.dtype", self.model.dtype, DTYPES)
        _choice("student.init", self.student.init, INIT_MODES)
        _choice("student.trainable", self.student.trainable, TRAINABLE)
        _choice("data.format", self.data.format, DATA_FORMATS)
        _choice("data.packing", self.data.packing, PACKING)
        _choice("loss.kd", self.loss.kd, KD_KINDS)
        _choice("loss.hidden", self.loss.hidden, HIDDEN_KINDS)
        _choice("loss.vocab", self.loss.vocab, VOCAB_MODES)
        _choice("optim.schedule", self.optim.schedule, SCHEDULES)
        if not self.out:
            raise ConfigError("out is not set: give --out DIR (the run directory)")
        if not self.data.path:
            raise ConfigError("data.path is not set: give --data FILE (jsonl/parquet/txt) or a hub dataset name")
        if resolve_shipped(self.data.path).exists():
            self.data.path = str(resolve_shipped(self.data.path))
        if self.student.layers is not None and self.student.report is not None:
            raise ConfigError("student.layers and student.report are both set: give one of --layers or --report/--k")
        if self.student.report is not None and self.student.k is None:
            raise ConfigError("student.report needs student.k (--k K, the number of layers to replace)")
        if self.student.layers is not None and not self.student.layers:
            raise ConfigError("student.layers is empty; give e.g. --layers 3,7")
        for key in ("data.seq_len", "train.steps", "train.micro_batch", "loss.chunk_tokens", "train.dist_timeout_s"):
            if self.get(key) < 1:
                raise ConfigError(f"{key} = {self.get(key)} must be >= 1")
        if self.data.seq_len < 2:
            raise ConfigError(f"data.seq_len = {self.data.seq_len} must be >= 2 (a token and its successor)")
        for key in ("train.grad_accum", "train.global_batch", "train.stop_after"):
            if self.get(key) is not None and self.get(key) < 1:
                raise ConfigError(f"{key} = {self.get(key)} must be >= 1 (or unset)")
        for key in ("checkpoint.every", "optim.warmup_steps", "optim.grad_clip", "optim.weight_decay",
                    "loss.kd_weight", "loss.hidden_weight", "loss.ce_weight"):
            if self.get(key) < 0:
                raise ConfigError(f"{key} = {self.get(key)} must be >= 0")
        if self.checkpoint.keep < 1:
            raise ConfigError(f"checkpoint.keep = {self.checkpoint.keep} must be >= 1")
        if not self.optim.lr > 0:
            raise ConfigError(f"optim.lr = {self.optim.lr} must be > 0")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio = {self.optim.min_lr_ratio} must be in [0, 1]")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError(f"optim.betas = {self.optim.betas}: give two numbers in [0, 1), e.g. 0.9,0.95")
        if not self.loss.temperature > 0:
            raise ConfigError(f"loss.temperature = {self.loss.temperature} must be > 0")
        if not 0 < self.loss.jsd_beta < 1:
            raise ConfigError(f"loss.jsd_beta = {self.loss.jsd_beta} must be in (0, 1)")
        kd_on = self.loss.kd != "none" and self.loss.kd_weight > 0
        hid_on = self.loss.hidden != "none" and self.loss.hidden_weight > 0
        if not (kd_on or hid_on or self.loss.ce_weight > 0):
            raise ConfigError(
                "every loss term is off: set loss.kd_weight > 0 (with loss.kd), loss.hidden_weight > 0 "
                "(with loss.hidden) or loss.ce_weight > 0"
            )
        if self.loss.layerwise and not hid_on:
            raise ConfigError(
                "loss.layerwise trains each replaced layer on its own output: set loss.hidden_weight > 0 "
                "(and loss.hidden mse or cosine)"
            )
        if self.checkpoint.resume not in (None, "auto", "none") and not Path(self.checkpoint.resume).exists():
            raise ConfigError(
                f"checkpoint.resume: {self.checkpoint.resume} does not exist; give 'auto' or a checkpoint "
                "directory (OUT/checkpoints or a step_* directory inside it)"
            )
        for key in ("deepspeed", "teacher.deepspeed"):
            p = resolve_shipped(self.get(key))
            if not p.is_file():
                raise ConfigError(f"{key}: {self.get(key)} not found; give a DeepSpeed JSON config (see ds_configs/)")
            self.set(key, str(p))
        return self


# -- helpers -------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_shipped(path: str | Path) -> Path:
    """A path as given, or else relative to the rad-ds checkout (``ds_configs/...``, ``configs/...``), so
    the shipped configs are found from any working directory."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p



def load_file(path: str | Path, what: str = "--config", hint: str = "") -> dict:
    """A YAML or JSON file holding a mapping -> dict, with a one-line error naming ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p}: file not found{hint}")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - json / yaml parse errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what} {p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and _is_section(key):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_section(key: str) -> bool:
    obj: Any = RunConfig
    for part in key.split("."):
        hints = typing.get_type_hints(obj) if isinstance(obj, type) else {}
        if part not in hints:
            return False
        obj = hints[part]
    return dataclasses.is_dataclass(obj)


def _resolve(cfg, key: str, source: str):
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            path = ".".join(parts[:i])
            known = [f"{path}.{n}" if path else n for n in names]
            close = difflib.get_close_matches(key, _all_keys(), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown setting {key!r}{hint}")
        if i == len(parts) - 1:
            value = getattr(obj, part)
            if dataclasses.is_dataclass(value):
                first = dataclasses.fields(value)[0].name
                raise ConfigError(f"{source}: {key!r} is a section; set one of its fields, e.g. {key}.{first}")
            return obj, part, typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{source}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
    raise ConfigError(f"{source}: empty setting name")


def _all_keys(obj=None, prefix: str = "") -> list[str]:
    obj = obj if obj is not None else RunConfig()
    keys = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            keys += _all_keys(v, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def field_help() -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) of every setting, for ``--help``."""
    rows = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            else:
                rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), v))

    walk(RunConfig(), "")
    return rows


_NONE = {"none", "null", "~", ""}


def _coerce(value: Any, tp, where: str):
    """Parse ``value`` (from YAML/JSON or a command-line string) as type ``tp``; one-line error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return _coerce(value, inner[0], where)
    if value is None:
        raise ConfigError(f"{where}: must not be empty (null); give a {getattr(tp, '__name__', tp)}")
    if origin is list:
        elem = args[0] if args else str
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import yaml

                value = yaml.safe_load(text)
            elif elem is int:
                from rad_ds.surgery import SurgeryError, parse_layers

                try:
                    return parse_layers(text)
                except SurgeryError:
                    raise ConfigError(f"{where}: {value!r} is not a list of integers (e.g. 3,7 or 4-6)") from None
            else:
                value = [v for v in text.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, elem, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``--a.b=v``, ``--a.b v`` and ``--a.b`` (a flag = true) -> [(key, value), ...]."""
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) < 3:
            raise ConfigError(f"command line: unexpected argument {a!r}; settings look like --train.steps=100")
        body = a[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 2
        else:
            key, value = body, "true"
            i += 1
        out.append((key.replace("-", "_"), value))
    return out


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r}: use one of {', '.join(choices)}")


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LogConfig", "LossConfig", "ModelConfig", "OptimConfig",
    "RunConfig", "StudentConfig", "TeacherConfig", "TrainConfig", "field_help", "load_file", "parse_overrides",
]
