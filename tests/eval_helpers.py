"""Tiny models for the evaluation tests: a word-level tokenizer whose words include the numbers 0..149, so
a random model writes numbers and GSM-style scoring has something to find."""

from __future__ import annotations

import json
from pathlib import Path

from tests.model_factories import CHAT_TEMPLATE, sharpen, tiny_hf_model

N_NUMBERS = 150


def numeric_tokenizer(vocab_size: int = 320, chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "</s>", "<user>", "<assistant>", "<system>"]
    words = special + [str(i) for i in range(N_NUMBERS)]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_models(tmp: Path, mamba_layers=(2,)) -> tuple[Path, Path]:
    """A sharpened tiny all-attention base and a student with ``mamba_layers`` replaced, with tokenizers."""
    from rad_ds.models.conversion import from_hf_model
    from rad_ds.surgery import replace_attention

    base = sharpen(from_hf_model(tiny_hf_model("llama3", max_position_embeddings=512)))
    base.save_pretrained(tmp / "base")
    numeric_tokenizer().save_pretrained(tmp / "base")
    replace_attention(base, list(mamba_layers))
    base.save_pretrained(tmp / "student")
    numeric_tokenizer().save_pretrained(tmp / "student")
    return tmp / "base", tmp / "student"


def write_gsm(path: Path, n: int = 8, answers=None) -> Path:
    """GSM8K-format records whose questions are in the tiny vocabulary."""
    rows = []
    for i in range(n):
        q = " ".join(f"w{(7 * i + 3 * j) % 160}" if j % 3 else str((5 * i + j) % N_NUMBERS) for j in range(5 + i % 4))
        a = answers[i] if answers is not None else str(i)
        rows.append({"question": q, "answer": f"w1 w2 {i} w3\n#### {a}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_texts(path: Path, n: int = 5) -> Path:
    paras = [" ".join(f"w{(13 * i + j) % 160}" if j % 4 else str((i + j) % N_NUMBERS) for j in range(20 + 9 * i))
             for i in range(n)]
    path.write_text("\n\n".join(paras) + "\n")
    return path


def strip_timings(results: dict) -> dict:
    """results.json without what depends on the clock or on the number of ranks."""
    out = json.loads(json.dumps(results))
    for k in ("created", "seconds", "world_size"):
        out.pop(k, None)
    for r in out["results"]:
        for k in ("tokens_per_second", "seconds", "wall_seconds"):
            r.pop(k, None)
        d = r.get("details") or {}
        for k in ("plain_tokens_per_second", "decode_tokens_per_second", "prefill_tokens_per_second", "paired"):
            d.pop(k, None)
        if d.get("speculative"):
            for k in ("tokens_per_second", "speedup", "speedup_ci95", "speedup_per_repeat"):
                d["speculative"].pop(k, None)
        if r["task"] == "speed":
            r.pop("score", None)
            r.pop("ci95", None)
    out["config"].pop("out", None)
    return out
