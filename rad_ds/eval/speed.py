"""Decoding speed: tokens/s of plain greedy decoding (batch 1, with the cache), and of self-speculative
decoding whose draft skips the attention layers of a diagnosis mask (``rad_ds.decoding.spec_decode``).

Greedy verification reproduces plain greedy decoding, so both decode the same tokens (checked and
reported as ``same_tokens``); the speed-up is the ratio of the two throughputs on the same prompts.
Prompts: the diagnosis prompt set (GSM-style math and HumanEval code, built in) or a local file.
"""

from __future__ import annotations

from dataclasses import dataclass

from rad_ds.decoding.skipping import check_mask
from rad_ds.decoding.spec_decode import SelfSpeculativeDecoder, SpecConfig, plain_decode


@dataclass(frozen=True)
class SkipMask:
    layers: tuple[int, ...]
    source: str  # "report.json k=4" or "--skip-layers"


def mask_from_report(path: str, k: int) -> SkipMask:
    """The draft mask of a diagnosis report's selection for ``k``."""
    from rad_ds.core.report import DiagnosisReport

    report = DiagnosisReport.load(path, "--report")
    return SkipMask(report.selection(k).layers, f"{report.path} k={k}")


def usable_mask(model, mask: SkipMask | None) -> tuple[frozenset[int] | None, str | None]:
    """(mask, None) when the model can draft with it, else (None, why not)."""
    if mask is None:
        return None, None
    if max(mask.layers, default=-1) >= model.config.num_hidden_layers:
        return None, f"the mask {list(mask.layers)} is for a deeper model ({model.config.num_hidden_layers} layers)"
    try:
        return check_mask(model.config, mask.layers), None
    except ValueError as e:
        return None, str(e)


def decode_prompts(model, prompts, max_new_tokens: int, eos_token_id, mask: frozenset[int] | None,
                   draft_len: int) -> list[dict]:
    """Per prompt: plain tokens/seconds and, with a mask, speculative tokens/seconds/acceptance."""
    if prompts:  # warm-up (allocator, kernels): not timed
        plain_decode(model, prompts[0], min(4, max_new_tokens), eos_token_id=eos_token_id)
    dec = None
    if mask is not None:
        dec = SelfSpeculativeDecoder(model, mask, SpecConfig(draft_len=draft_len, max_new_tokens=max_new_tokens,
                                                             eos_token_id=eos_token_id))
        if prompts:
            warm = SpecConfig(draft_len=draft_len, max_new_tokens=min(4, max_new_tokens), eos_token_id=eos_token_id)
            SelfSpeculativeDecoder(model, mask, warm).generate(prompts[0])
    out = []
    for p in prompts:
        pl = plain_decode(model, p, max_new_tokens, eos_token_id=eos_token_id)
        row = {"plain_tokens": len(pl.tokens), "plain_seconds": pl.seconds}
        if dec is not None:
            sp = dec.generate(p)
            row.update(spec_tokens=len(sp.tokens), spec_seconds=sp.seconds, accepted=sum(sp.accepted),
                       drafted=sum(sp.drafted), rounds=sp.rounds, same_tokens=sp.tokens == pl.tokens)
        out.append(row)
    return out


def summarize(rows: list[dict]) -> dict:
    def rate(tok, sec):
        t, s = sum(r[tok] for r in rows), sum(r[sec] for r in rows)
        return t / s if s > 0 else float("nan")

    out = {"prompts": len(rows), "plain_tokens": sum(r["plain_tokens"] for r in rows),
           "plain_tokens_per_second": rate("plain_tokens", "plain_seconds")}
    if rows and "spec_tokens" in rows[0]:
        drafted = sum(r["drafted"] for r in rows)
        rounds = sum(r["rounds"] for r in rows)
        out.update(spec_tokens=sum(r["spec_tokens"] for r in rows),
                   spec_tokens_per_second=rate("spec_tokens", "spec_seconds"),
                   acceptance_rate=sum(r["accepted"] for r in rows) / drafted if drafted else 0.0,
                   mean_accepted_length=sum(r["accepted"] for r in rows) / rounds if rounds else 0.0,
                   same_tokens=all(r["same_tokens"] for r in rows))
        out["speedup"] = out["spec_tokens_per_second"] / out["plain_tokens_per_second"]
    return out


__all__ = ["SkipMask", "decode_prompts", "mask_from_report", "summarize", "usable_mask"]
