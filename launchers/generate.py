"""Generate text from a base model or a hybrid student (greedy by default).

    python launchers/generate.py --model runs/student --prompt "What is 12*7?"
    python launchers/generate.py --model embedded:smollm2 --prompt "Write a haiku" --sample --temperature 0.7

Single process, CPU or GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rad_ds.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model dir, .gguf file, or embedded:smollm2")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--prompt", action="append", required=True, help="may be given several times")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from rad_ds.generation import generate_text
    from rad_ds.models.conversion import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok = load_model(args.model, gguf_file=args.gguf_file, dtype=dtype)
    if tok is None:
        raise ValueError(f"--model {args.model}: no tokenizer found next to the weights")
    model.to(device)
    print(f"model: {args.model}  layer_types: {''.join('A' if t == 'attention' else 'M' for t in model.config.layer_types)}")
    for prompt in args.prompt:
        r = generate_text(model, tok, prompt, args.max_new_tokens, chat=not args.no_chat, do_sample=args.sample,
                          temperature=args.temperature, seed=args.seed)
        print(f"\n>>> {prompt}\n{r.text}\n[{r.new_tokens} tokens, {r.tokens_per_second:.1f} tok/s]")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
