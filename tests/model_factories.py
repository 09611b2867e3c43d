"""Tiny transformers models of each supported family, built locally (no hub), for import tests."""

from __future__ import annotations

import torch

TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
)


def tiny_hf_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny HF causal LM. Families: llama, llama3 (llama3 rope scaling, untied),
    qwen2 (q/k/v biases), mistral (sliding window), headdim (head_dim != hidden/heads), qwen3 (q/k RMSNorm per
    head, head_dim 32 != hidden/heads; ``head_dim=16`` overrides it)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    kw = dict(TINY)
    if family == "llama":
        kw.update(tie_word_embeddings=True)
        cfg_cls, model_cls = LlamaConfig, LlamaForCausalLM
    elif family == "llama3":
        kw.update(tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        })
        cfg_cls, model_cls = LlamaConfig, LlamaForCausalLM
    elif family == "llama_bias":
        kw.update(attention_bias=True, mlp_bias=True)
        cfg_cls, model_cls = LlamaConfig, LlamaForCausalLM
    elif family == "qwen2":
        kw.update(tie_word_embeddings=True)
        cfg_cls, model_cls = Qwen2Config, Qwen2ForCausalLM
    elif family == "mistral":
        kw.update(sliding_window=8, tie_word_embeddings=False)
        cfg_cls, model_cls = MistralConfig, MistralForCausalLM
    elif family == "qwen3":
        kw.update(head_dim=32, tie_word_embeddings=True)
        cfg_cls, model_cls = Qwen3Config, Qwen3ForCausalLM
    elif family == "headdim":
        kw.update(head_dim=32)
        cfg_cls, model_cls = LlamaConfig, LlamaForCausalLM
    else:
        raise ValueError(family)
    kw.update(overrides)
    model = model_cls(cfg_cls(**kw)).eval()
    # random init leaves biases at zero: make them non-trivial so the import is really tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny(tmp_path, family: str = "llama", **overrides):
    """Save a tiny HF model (no tokenizer) to ``tmp_path/family`` and return the path."""
    model = tiny_hf_model(family, **overrides)
    out = tmp_path / family
    model.save_pretrained(out)
    return out, model


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tiny_tokenizer(vocab_size: int = 320, chat: bool = True):
    """A word-level tokenizer over the words w0..w{N}, with <unk>, </s> (eos) and role tags; built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "</s>", "<user>", "<assistant>", "<system>"]
    vocab = {t: i for i, t in enumerate(special)}
    for i in range(vocab_size - len(special)):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def sharpen(model, attn_scales=None, embed_scale: float = 3.0):
    """Make a random tiny model confident (sharper logits) and its attention layers unequally important,
    so that skip masks give a spread of acceptance rates, as a real model's do."""
    with torch.no_grad():
        layers = model.model.layers
        scales = attn_scales or [1.0, 0.3, 0.5, 0.2, 0.4, 0.6, 0.8, 0.1][: len(layers)]
        for layer, s in zip(layers, scales):
            if layer.layer_type == "attention":
                layer.self_attn.o_proj.weight.mul_(s)
        model.model.embed_tokens.weight.mul_(embed_scale)
    return model


def save_tiny_with_tokenizer(tmp_path, family: str = "llama3", name: str = "base", **overrides):
    """A sharpened tiny all-attention hybrid + tokenizer saved as an HF dir."""
    from rad_ds.models.conversion import from_hf_model

    model = sharpen(from_hf_model(tiny_hf_model(family, **overrides)))
    out = tmp_path / name
    model.save_pretrained(out)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(out)
    return out, model
