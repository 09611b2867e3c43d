"""Distil a Transformer into a Transformer/Mamba2 hybrid (RAD): a frozen ZeRO-3 teacher engine and a
ZeRO-3 student engine fed the same batches; sharded checkpoints, resume, export to an HF directory.

Single process (CPU or one GPU):
    python launchers/distill.py --model embedded:smollm2 --layers 22,25 --data chat.jsonl --out runs/rad \\
        --steps 200 --seq-len 512 --micro-batch 4

2 ranks on one node (2 GPUs, or 2 CPU processes over gloo), the same with torchrun:
    deepspeed --num_gpus 2 launchers/distill.py --config configs/smollm2_rad.yaml --data chat.jsonl --out runs/rad
    torchrun --standalone --nproc_per_node 2 launchers/distill.py --config configs/smollm2_rad.yaml \\
        --data chat.jsonl --out runs/rad

Multi-node (a hostfile of `host slots=N` lines; passwordless ssh + pdsh; a filesystem shared by the nodes):
    deepspeed --hostfile hostfile launchers/distill.py --config configs/smollm2_rad.yaml \\
        --deepspeed ds_configs/zero3.json --data chat.jsonl --out /shared/runs/rad

Resume: add --resume auto (latest complete checkpoint, or fresh) or --resume PATH. Any setting of the
run config can be given as --section.field=value (listed below); --config reads YAML/JSON first.
Writes OUT/checkpoints/, OUT/final/ (HF directory), OUT/metrics.jsonl, OUT/summary.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rad_ds.cli import run_cli  # noqa: E402

# friendly flag -> dotted setting
FLAGS = {
    "--model": "model.path", "--gguf-file": "model.gguf_file", "--teacher": "teacher.path",
    "--layers": "student.layers", "--report": "student.report", "--k": "student.k",
    "--data": "data.path", "--out": "out", "--steps": "train.steps", "--seq-len": "data.seq_len",
    "--micro-batch": "train.micro_batch", "--grad-accum": "train.grad_accum",
    "--global-batch": "train.global_batch", "--lr": "optim.lr", "--resume": "checkpoint.resume",
    "--deepspeed": "deepspeed",
}


def build_parser():
    from rad_ds.config import field_help

    settings = "\n".join(f"  --{k}  {h} (default: {d!r})" for k, h, d in field_help())
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run-config settings (--section.field=value):\n" + settings,
    )
    ap.add_argument("--config", help="run config (YAML or JSON), applied before the other flags")
    for flag, key in FLAGS.items():
        ap.add_argument(flag, dest=key.replace(".", "__"), default=None, help=f"= --{key}")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return ap


def make_config(argv=None):
    from rad_ds.config import RunConfig

    args, rest = build_parser().parse_known_args(argv)
    cfg = RunConfig.load(args.config) if args.config else RunConfig()
    for key in FLAGS.values():
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            cfg.set(key, value, source="command line")
    cfg.apply_overrides(rest)
    return cfg


def main(argv=None):
    cfg = make_config(argv)
    from rad_ds.distill import distill
    from rad_ds.distill.checkpoint import NonFiniteError

    try:
        result = distill(cfg)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    s = result.summary
    if s:
        print(
            f"distilled layers {s['replaced_layers']}, steps {s['start_step']}..{s['last_step']} of {s['steps']}: loss "
            f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}, {s['tokens']} tokens, {s['tokens_per_s']:.0f} tok/s, "
            f"peak {s['peak_mem_mb']:.0f} MiB/rank; checkpoint {s['checkpoint']}"
            + (f"; exported {s['export']}" if s.get("export") else "")
        )
    else:
        print(f"nothing to do: {result.checkpoint} is at step >= {result.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
