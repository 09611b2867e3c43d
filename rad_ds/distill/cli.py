"""``rad-distill`` / ``launchers/distill.py`` and ``rad-export`` / ``launchers/export.py`` from the command line."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from rad_ds.core.cli import Flag, parse_config, run_cli
from rad_ds.core.dtypes import to_dtype

from .checkpoint import NonFiniteError
from .config import DistillConfig
from .export import export_any
from .run import distill

# friendly flag -> dotted setting
FLAGS = {flag: Flag(key) for flag, key in {
    "--model": "model.path", "--gguf-file": "model.gguf_file", "--teacher": "teacher.path",
    "--layers": "student.layers", "--report": "student.report", "--k": "student.k",
    "--data": "data.path", "--out": "out", "--steps": "train.steps", "--seq-len": "data.seq_len",
    "--micro-batch": "train.micro_batch", "--grad-accum": "train.grad_accum",
    "--global-batch": "train.global_batch", "--lr": "optim.lr", "--resume": "checkpoint.resume",
    "--deepspeed": "deepspeed",
}.items()}


def make_config(argv: list[str] | None = None, doc: str | None = None) -> DistillConfig:
    """The run config of a command line: ``--config FILE``, then the flags above, then ``--section.field=value``."""
    return parse_config(DistillConfig, argv, doc or __doc__, FLAGS)


def _summary_line(s: dict) -> str:
    if s.get("finished_after_interruption"):
        return (f"finished the interrupted run at step {s['last_step']} of {s['steps']}: checkpoint {s['checkpoint']}"
                + (f"; exported {s['export']}" if s.get("export") else "") + "; summary.json written")
    return (f"distilled layers {s['replaced_layers']}, steps {s['start_step']}..{s['last_step']} of {s['steps']}: "
            f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, {s['tokens']} tokens, {s['tokens_per_s']:.0f} "
            f"tok/s, peak {s['peak_mem_mb']:.0f} MiB/rank; checkpoint {s['checkpoint']}"
            + (f"; exported {s['export']}" if s.get("export") else ""))


def run(argv: list[str] | None = None, doc: str | None = None) -> int:
    cfg = make_config(argv, doc)
    try:
        result = distill(cfg)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.summary:
        print(_summary_line(result.summary))
    else:
        print(f"nothing to do: {result.out} holds a finished run of {result.steps} steps "
              f"(pass --overwrite to replace it)")
    return 0


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    return run_cli(lambda a: run(a, doc), argv)


def export_main(argv: list[str] | None = None, doc: str | None = None) -> int:
    def run_export(a):
        ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        src = ap.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint",
                         help="a run dir, its checkpoints/ dir (latest complete checkpoint) or a step_* dir")
        src.add_argument("--model", help="a student directory (rad_hybrid, e.g. what launchers/replace.py writes); "
                                         "with --format native")
        ap.add_argument("--out", required=True, help="output HF directory")
        ap.add_argument("--format", default="rad_hybrid", choices=["rad_hybrid", "native"],
                        help="rad_hybrid: rad-ds' own class (trust_remote_code=True); native: an architecture "
                             "transformers implements itself (GraniteMoeHybrid), which vLLM serves")
        ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
        args = ap.parse_args(a)
        if args.model and args.format != "native":
            ap.error("--model DIR is already a rad_hybrid directory: give --format native to convert it")
        out = export_any(args.checkpoint or args.model, args.out, native=args.format == "native",
                         from_checkpoint=args.checkpoint is not None, overwrite=args.overwrite,
                         dtype=to_dtype(args.dtype))
        print(f"exported {args.checkpoint or args.model} -> {out} ({args.format})")
        return 0

    return run_cli(run_export, argv)


__all__ = ["FLAGS", "export_main", "main", "make_config", "run"]
