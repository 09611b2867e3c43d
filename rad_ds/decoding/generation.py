"""Text generation helpers over RadHybridForCausalLM (greedy or sampled, with the hybrid cache)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rad_ds.core.batching import pad_id
from rad_ds.decoding.prompts import encode
from rad_ds.models.static_decode import StaticDecoder


@dataclass
class GenerationResult:
    prompt: str
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids ``(1, L)`` of ``prompt``; with ``chat`` and a chat template, as one user turn."""
    return encode(tokenizer, "text", prompt, chat).view(1, -1)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True,
                  do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                  static: bool = False) -> GenerationResult:
    """``static``: greedy decoding with ``StaticDecoder`` (fixed-shape state; a CUDA graph per step on CUDA)."""
    ids = encode_prompt(tokenizer, prompt, chat=chat).to(model.device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if static:
        if do_sample:
            raise ValueError("--static decodes greedily; drop --sample or --static")
        dec = StaticDecoder(model, batch_size=1, max_len=ids.size(1) + max_new_tokens)
        out = dec.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    else:
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature if do_sample else None, top_p=None, top_k=None,
            pad_token_id=pad_id(tokenizer),
        )
    dt = time.perf_counter() - t0
    new = out[0, ids.size(1):]
    return GenerationResult(prompt, tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), dt)
