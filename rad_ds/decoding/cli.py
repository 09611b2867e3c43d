"""``rad-generate`` / ``launchers/generate.py``: text from a base model or a hybrid student."""

from __future__ import annotations

import argparse

import torch

from rad_ds.core.cli import run_cli
from rad_ds.core.layers import layers_string
from rad_ds.models.conversion import load_model

from .generation import generate_text


def parse_args(argv=None, doc=None):
    ap = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model dir, .gguf file, or embedded:smollm2")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--prompt", action="append", required=True, help="may be given several times")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--static", action="store_true",
                    help="greedy decoding on fixed-shape state, captured as a CUDA graph on a GPU (rad-ds models)")
    return ap.parse_args(argv)


def run(argv=None, doc=None):
    args = parse_args(argv, doc)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok = load_model(args.model, gguf_file=args.gguf_file, dtype=dtype)
    if tok is None:
        raise ValueError(f"--model {args.model}: no tokenizer found next to the weights")
    model.to(device)
    print(f"model: {args.model}  layer_types: {layers_string(model.config)}")
    for prompt in args.prompt:
        r = generate_text(model, tok, prompt, args.max_new_tokens, chat=not args.no_chat, do_sample=args.sample,
                          temperature=args.temperature, seed=args.seed, static=args.static)
        print(f"\n>>> {prompt}\n{r.text}\n[{r.new_tokens} tokens, {r.tokens_per_second:.1f} tok/s]")
    return 0


def main(argv=None, doc=None) -> int:
    return run_cli(lambda a: run(a, doc), argv)


__all__ = ["main", "run"]
