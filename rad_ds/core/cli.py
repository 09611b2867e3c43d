"""Command lines of every stage: a typed config from ``--config FILE``, flags and dotted settings
(``parse_config``); user errors as one line and a non-zero exit (``run_cli``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# ``logger.info(..., extra={ANY_RANK: True})``: an INFO line shown whichever rank logs it (an event that one process
# does for all, such as importing the embedded model once); other INFO lines are rank 0's alone
ANY_RANK = "rad_ds_any_rank"

# errors that come from the user's input: print one line, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError, TimeoutError)


def quiet_libraries() -> None:
    """Output a person can read: on a machine without CUDA DeepSpeed is told it runs on the CPU (instead of
    warning so at every import), and transformers' per-file progress bars ("Loading weights", "Writing model
    shards") stay off; their warnings still show."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from transformers.utils import logging as hf_logging  # deferred: ~1 s; rad-evaluate, rad-corpus --help skip it

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a requirement
        pass


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a launcher's ``main``: rank 0 logs at INFO, the other ranks only warnings (no line repeated per rank);
    user errors are one line and exit 2."""
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    if rank != 0:  # warnings, and the INFO lines of events one process does for all (ANY_RANK), e.g. a model import
        for h in logging.getLogger().handlers:
            h.addFilter(lambda r: r.levelno >= logging.WARNING or getattr(r, ANY_RANK, False))
    quiet_libraries()
    try:
        rc = main(argv)
    except USER_ERRORS as e:
        msg = str(e).strip().strip('"') or type(e).__name__
        print(f"error: {msg.splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


@dataclass(frozen=True)
class Flag:
    """A command-line flag that is not simply ``--<setting>``: a rename (``--model`` -> ``model.path``), a
    switch setting a constant (``--no-chat`` -> ``chat=false``) or a repeatable flag (``--model A --model B``)."""

    key: str
    const: Any = None
    append: bool = False
    help: str = ""
    parse: Callable[[Any, Any], Any] | None = None  # (value, config) -> value; applied after the other settings


def parse_config(cls, argv: list[str] | None, doc: str | None, flags: dict[str, Flag] | None = None,
                 required: tuple[str, ...] = ()):
    """A ``cls`` config from ``--config FILE`` (YAML/JSON), then ``flags``, then ``--setting=value`` /
    ``--setting value`` / ``--section.setting=value`` for every other setting (dashes = underscores).
    ``--help`` lists every setting with its help and default. Not validated: the stage does that."""
    flags = flags or {}
    short = cls.primaries()  # model.path -> model: the section's own name sets its primary field

    def name(k: str) -> str:
        return f"--{k if '.' in k else k.replace('_', '-')}"

    settings = "\n".join(f"  {name(short[k]) + ', ' if k in short else ''}{name(k)}  {h} (default: {d!r})"
                         for k, h, d in cls.field_help())
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="settings (--name=value or --name value; --config FILE first):\n" + settings,
                                 allow_abbrev=False)
    ap.add_argument("--config", help="settings from a YAML or JSON file, applied before the flags")
    for name, f in flags.items():
        dest = "flag_" + name.lstrip("-").replace("-", "_")
        if f.const is not None:
            ap.add_argument(name, dest=dest, action="store_const", const=f.const, default=None, help=f.help)
        else:
            ap.add_argument(name, dest=dest, action="append" if f.append else "store", default=None,
                            metavar=f.key.split(".")[-1].upper(), help=f.help or f"= --{f.key}")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args, rest = ap.parse_known_args(argv)
    cfg = cls.load(args.config) if args.config else cls()
    given = {name: getattr(args, "flag_" + name.lstrip("-").replace("-", "_")) for name in flags}
    for name, f in flags.items():
        if given[name] is not None and f.parse is None:
            cfg.set(f.key, given[name], source=f"command line {name}")
    cfg.apply_overrides(rest)
    for name, f in flags.items():
        if given[name] is not None and f.parse is not None:
            cfg.set(f.key, f.parse(given[name], cfg), source=f"command line {name}")
    missing = [k for k in required if cfg.get(k) in (None, [], {})]
    if missing:
        names = {f.key: flag for flag, f in flags.items()}
        ap.error("missing " + ", ".join(names.get(k) or name(short.get(k, k)) for k in missing))
    return cfg
