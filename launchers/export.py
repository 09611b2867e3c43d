"""Export a distillation checkpoint as an HF directory (safetensors, config with layer_types, tokenizer,
model code), loadable with RadHybridForCausalLM and with plain transformers (trust_remote_code=True).

    python launchers/export.py --checkpoint runs/rad --out runs/rad-export               # latest checkpoint
    python launchers/export.py --checkpoint runs/rad/checkpoints/step_00000200 --out runs/rad-200

One process, no process group: the shards of every rank are consolidated with DeepSpeed's zero_to_fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rad_ds.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="a run dir, its checkpoints/ dir (latest complete checkpoint) or a step_* dir")
    ap.add_argument("--out", required=True, help="output HF directory")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from rad_ds.distill.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, dtype=getattr(torch, args.dtype))
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
