"""Decoding speed: tokens/s of plain greedy decoding (batch 1, with the cache), and of self-speculative
decoding whose draft skips the attention layers of a diagnosis mask (``rad_ds.decoding.spec_decode``).

A single timing on a shared machine is noise (one run printed base 24.0 vs student 13.2 tok/s, another
14.2 vs 15.2), so the models are timed **round-robin on the same prompts**: in repeat r model A decodes every
prompt, then model B, ..., and every repeat gives each model a throughput. Reported per model: the median over the
repeats with its order-statistic interval (``core.intervals.median_interval``), of

* decode tokens/s: the tokens after the first over the time from the first new token to the last (the
  prompt's forward pass is excluded; it is reported separately as prefill tokens/s = prompt tokens / time to
  the first token);
* for the 2nd, 3rd... model, the paired ratio per repeat of its decode tokens/s to the first model's (the
  same repeat, adjacent in time), with its median and interval: the number a comparison should quote.

Greedy verification reproduces plain greedy decoding, so both decode the same tokens (checked and
reported as ``same_tokens``); the speculative speed-up is the per-repeat ratio of the two end-to-end
throughputs on the same prompts (prefill included on both sides: speculative decoding's first round feeds the
prompt to the draft and, with the first drafts, to the verifier, so it has no clean prefill to take out).
Prompts: the diagnosis prompt set (GSM-style math and HumanEval code, built in) or a local file.

``SpeedTask`` is the evaluation's speed task: it prepares each model's prompts while the runner has it loaded,
holds it, and times all of them after the runner's per-model loop (``speed_interleave=false``: each model
alone, at once, for models that do not fit in memory together).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rad_ds.core import dist
from rad_ds.core.intervals import median_interval
from rad_ds.core.report import DiagnosisReport
from rad_ds.decoding.eos import model_eos_ids
from rad_ds.decoding.prompts import load_prompts
from rad_ds.decoding.skipping import check_mask
from rad_ds.decoding.spec_decode import SelfSpeculativeDecoder, SpecConfig, plain_decode

from .batching import gather

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkipMask:
    layers: tuple[int, ...]
    source: str  # "report.json k=4" or "--skip-layers"


def mask_from_report(path: str, k: int) -> SkipMask:
    """The draft mask of a diagnosis report's selection for ``k``."""
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


@dataclass
class SpeedModel:
    """One model as the speed task times it: its prompts (this rank's share, in its own tokenizer), its EOS
    ids and, when it can draft, the speculative mask."""

    label: str
    model: object
    prompts: list
    eos: list[int]
    mask: frozenset[int] | None
    max_new_tokens: int
    draft_len: int
    decoder: SelfSpeculativeDecoder | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mask is not None:
            self.decoder = SelfSpeculativeDecoder(self.model, self.mask, SpecConfig(
                draft_len=self.draft_len, max_new_tokens=self.max_new_tokens, eos_token_id=self.eos))

    def warm_up(self) -> None:
        """Allocator and kernels: a few untimed tokens of the first prompt, plain and speculative."""
        if not self.prompts:
            return
        n = min(4, self.max_new_tokens)
        plain_decode(self.model, self.prompts[0], n, eos_token_id=self.eos)
        if self.mask is not None:
            warm = SpecConfig(draft_len=self.draft_len, max_new_tokens=n, eos_token_id=self.eos)
            SelfSpeculativeDecoder(self.model, self.mask, warm).generate(self.prompts[0])

    def decode(self) -> list[dict]:
        """One pass over the prompts. Per prompt: prompt tokens, the plain decode's tokens and seconds split
        into prefill (to the first new token) and decode (first to last), and with a mask the speculative
        tokens/seconds/acceptance."""
        out = []
        for p in self.prompts:
            pl = plain_decode(self.model, p, self.max_new_tokens, eos_token_id=self.eos)
            n = len(pl.tokens)
            row = {"prompt_tokens": int(p.numel()), "plain_tokens": n, "plain_seconds": pl.seconds,
                   "prefill_seconds": pl.prefill_seconds, "decode_tokens": max(n - 1, 0),
                   "decode_seconds": pl.seconds - pl.prefill_seconds}
            if self.decoder is not None:
                sp = self.decoder.generate(p)
                row.update(spec_tokens=len(sp.tokens), spec_seconds=sp.seconds, accepted=sum(sp.accepted),
                           drafted=sum(sp.drafted), rounds=sp.rounds, same_tokens=sp.tokens == pl.tokens)
            out.append(row)
        return out


def measure(models: list[SpeedModel], repeats: int, between: Callable[[], None] | None = None
            ) -> dict[str, list[list[dict]]]:
    """Every model warmed up, then ``repeats`` rounds of: each model in turn decodes all its prompts.
    Returns label -> per repeat, the per-prompt rows. ``between`` runs before each model's turn (a barrier
    keeps the ranks in the same turn)."""
    for m in models:
        m.warm_up()
    out: dict[str, list[list[dict]]] = {m.label: [] for m in models}
    for _ in range(repeats):
        for m in models:
            if between is not None:
                between()
            out[m.label].append(m.decode())
    return out


def _rate(rows: list[dict], tok: str, sec: str) -> float:
    t, s = sum(r[tok] for r in rows), sum(r[sec] for r in rows)
    return t / s if s > 0 else float("nan")


def spread(values: list[float]) -> dict:
    """{median, ci95, coverage, per_repeat} of per-repeat values (``median_interval``)."""
    med, ci, cov = median_interval(values)
    return {"median": med, "ci95": ci, "coverage": cov, "per_repeat": list(values)}


def repeat_summary(rows: list[dict]) -> dict:
    """One repeat, all prompts (all ranks): the throughputs as ratios of sums."""
    out = {"decode": _rate(rows, "decode_tokens", "decode_seconds"),
           "prefill": _rate(rows, "prompt_tokens", "prefill_seconds"),
           "plain": _rate(rows, "plain_tokens", "plain_seconds")}
    if rows and "spec_tokens" in rows[0]:
        out["spec"] = _rate(rows, "spec_tokens", "spec_seconds")
        out["speedup"] = out["spec"] / out["plain"]
    return out


def summarize(repeats: list[list[dict]]) -> dict:
    """Per-repeat rows (gathered over ranks) -> the model's speed: medians and intervals over the repeats;
    the token counts and acceptance of the first repeat (greedy: every repeat decodes the same tokens)."""
    per = [repeat_summary(rows) for rows in repeats]
    first = repeats[0]
    out = {"prompts": len(first), "repeats": len(repeats),
           "plain_tokens": sum(r["plain_tokens"] for r in first),
           "prompt_tokens": sum(r["prompt_tokens"] for r in first),
           "decode_tokens": sum(r["decode_tokens"] for r in first),
           "plain_tokens_per_second": statistics.median(p["plain"] for p in per),
           "decode_tokens_per_second": spread([p["decode"] for p in per]),
           "prefill_tokens_per_second": spread([p["prefill"] for p in per])}
    if first and "spec_tokens" in first[0]:
        drafted = sum(r["drafted"] for r in first)
        rounds = sum(r["rounds"] for r in first)
        out.update(spec_tokens=sum(r["spec_tokens"] for r in first),
                   spec_tokens_per_second=statistics.median(p["spec"] for p in per),
                   acceptance_rate=sum(r["accepted"] for r in first) / drafted if drafted else 0.0,
                   mean_accepted_length=sum(r["accepted"] for r in first) / rounds if rounds else 0.0,
                   same_tokens=all(r["same_tokens"] for rows in repeats for r in rows),
                   speedup=spread([p["speedup"] for p in per]))
    return out


def paired_ratio(model: list[float], reference: list[float]) -> dict:
    """Per repeat, ``model[r] / reference[r]`` (timed in the same round), with its median and interval."""
    if len(model) != len(reference):
        raise ValueError(f"paired_ratio: {len(model)} repeats against {len(reference)}")
    return spread([m / r if r > 0 else float("nan") for m, r in zip(model, reference)])


class SpeedTask:
    """The speed task over all models: each model's prompts are prepared while it is loaded; the timing runs
    round-robin over the models after the per-model loop (``finish``), the models held until then. With
    ``speed_interleave=false`` (models that do not fit together) each model is timed at once, alone."""

    def __init__(self, cfg, mask: SkipMask | None, rank: int, world: int):
        self.cfg, self.mask, self.rank, self.world = cfg, mask, rank, world
        self.held: list[SpeedModel] = []
        self.runs: dict[str, list[list[dict]]] = {}  # label -> per repeat, the per-prompt rows of all ranks
        self.why_not: dict[str, str] = {}  # label -> why it cannot draft with the mask
        self.layers: dict[str, list[int]] = {}  # label -> the draft's skipped layers
        self.wall: dict[str, float] = {}

    def add(self, label: str, model, tok, chat: bool) -> None:
        """The model's speed prompts (this rank's share); held for ``finish`` or, not interleaved, timed now."""
        cfg = self.cfg
        max_new = cfg.max_new_tokens or 64
        prompts = load_prompts(tok, cfg.data.get("speed"), cfg.speed_prompts, cfg.seed, chat, max_new,
                               getattr(model.config, "max_position_embeddings", None), what="--data speed")
        use, why_not = usable_mask(model, self.mask)
        if use is not None:
            self.layers[label] = sorted(use)
        if why_not:
            self.why_not[label] = why_not
            if self.rank == 0:  # expected for a student whose mask layers are Mamba2 now; the row records it too
                logger.info("%s: speculative decoding skipped: %s", label, why_not)
        sm = SpeedModel(label, model, prompts[self.rank::self.world], sorted(model_eos_ids(tok, model)), use, max_new,
                        cfg.draft_len)
        if cfg.speed_interleave:
            self.held.append(sm)
        else:
            self._time([sm])

    def _time(self, models: list[SpeedModel]) -> None:
        t0 = time.perf_counter()
        runs = measure(models, self.cfg.speed_repeats, between=dist.barrier)
        wall = time.perf_counter() - t0
        for m in models:
            self.runs[m.label] = [gather(rows) for rows in runs[m.label]]
            self.wall[m.label] = wall

    def finish(self) -> list[dict]:
        """One row per model, in the order they were added; the 2nd... model's row holds its paired ratio to
        the first model's decode tokens/s."""
        if self.held:
            self._time(self.held)
            self.held = []
        labels = list(self.runs)
        if len(labels) > 1 and not self.cfg.speed_interleave and self.rank == 0:
            logger.warning("speed: the models were timed one after another (speed_interleave=false); their ratio "
                           "pairs repeats that were not adjacent in time, so it carries the machine's drift")
        summaries = {label: summarize(self.runs[label]) for label in labels}
        return [self._row(label, summaries[label], summaries[labels[0]] if label != labels[0] else None, labels[0])
                for label in labels]

    def _row(self, label: str, s: dict, ref: dict | None, ref_label: str) -> dict:
        cfg, decode = self.cfg, s["decode_tokens_per_second"]
        details = {"plain_tokens_per_second": s["plain_tokens_per_second"], "prompts": s["prompts"],
                   "plain_tokens": s["plain_tokens"], "max_new_tokens": cfg.max_new_tokens or 64,
                   "draft_len": cfg.draft_len, "repeats": s["repeats"],
                   "order": "interleaved" if cfg.speed_interleave else "sequential",
                   "prompt_tokens": s["prompt_tokens"], "decode_tokens": s["decode_tokens"],
                   "decode_tokens_per_second": decode, "prefill_tokens_per_second": s["prefill_tokens_per_second"]}
        if ref is not None:
            details["paired"] = {"against": ref_label, "what": "decode tokens/s ratio, per repeat",
                                 **paired_ratio(decode["per_repeat"], ref["decode_tokens_per_second"]["per_repeat"])}
        if "spec_tokens" in s:
            details["speculative"] = {"layers": self.layers[label], "mask_source": self.mask.source,
                                      "tokens_per_second": s["spec_tokens_per_second"],
                                      "acceptance_rate": s["acceptance_rate"],
                                      "mean_accepted_length": s["mean_accepted_length"],
                                      "speedup": s["speedup"]["median"], "speedup_ci95": s["speedup"]["ci95"],
                                      "speedup_per_repeat": s["speedup"]["per_repeat"], "same_tokens": s["same_tokens"]}
        elif label in self.why_not:
            details["speculative_skipped"] = self.why_not[label]
        return {"model": label, "task": "speed", "n": s["prompts"], "metric": "decode tokens/s",
                "score": decode["median"], "stderr": None, "ci95": decode["ci95"],
                "tokens_per_second": decode["median"],
                "source": cfg.data.get("speed") or "diagnosis prompt mix (GSM-style math + HumanEval)",
                "details": details, "wall_seconds": self.wall[label]}


__all__ = ["SkipMask", "SpeedModel", "SpeedTask", "mask_from_report", "measure", "paired_ratio", "repeat_summary",
           "spread", "summarize", "usable_mask"]
