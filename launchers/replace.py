"""Replace attention layers of a model with Mamba2 mixers initialised from the attention weights.

Writes a student checkpoint (safetensors + config with ``layer_types`` / ``replaced_layers`` +
tokenizer + model code, so it also loads with plain transformers and ``trust_remote_code=True``)
and ``replacement.json``, the record of what was replaced.

    python launchers/replace.py --model embedded:smollm2 --layers 3,7 --out runs/student
    python launchers/replace.py --model /models/Llama-3.2-1B --layers 4-6,11 --out runs/student
    python launchers/replace.py --model DIR --gguf-file model.Q8_0.gguf --layers 3 --out runs/student
    python launchers/replace.py --model DIR --report runs/diag/report.json --k 4 --out runs/student

Single process, CPU or GPU; no launcher needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rad_ds.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="HF model dir (Llama/Qwen2/Mistral/SmolLM or rad_hybrid), a .gguf file, or embedded:smollm2")
    ap.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    sel = ap.add_mutually_exclusive_group(required=True)
    sel.add_argument("--layers", help="layer indices to replace, e.g. 3,7,11 or 4-6")
    sel.add_argument("--report", help="a diagnosis report.json; use with --k")
    ap.add_argument("--k", type=int, default=None, help="with --report: how many layers (a k the report holds)")
    ap.add_argument("--out", required=True, help="output directory for the student checkpoint")
    ap.add_argument("--init", default="attention", choices=["attention", "random"],
                    help="attention: MambaInLlama mapping (V->x, K->B, Q->C, O->out_proj); random: ablation")
    ap.add_argument("--allow-all", action="store_true", help="allow replacing every attention layer")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Mamba2 init (z, dt, conv, A)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from rad_ds.surgery import build_student, parse_layers

    layers = parse_layers(args.layers) if args.layers is not None else None
    record = build_student(
        args.model, args.out, layers=layers, report=args.report, k=args.k, gguf_file=args.gguf_file,
        init=args.init, allow_all=args.allow_all, seed=args.seed, overwrite=args.overwrite,
    )
    print(f"replaced layers {record.layers} (init={record.init}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
