"""Cost models for self-speculative decoding: what a draft step and a verify pass cost, relative to one
plain decoding step of the full model, and the throughput estimate that combines them with acceptance.

* ``measured``: timed on this machine at a typical context length: a draft step costs
  ``1 - k * attn_fraction`` of a full step (linear in the number of skipped attention sublayers; the
  fraction is timed with every candidate skipped), and verifying ``m`` tokens costs
  ``1 + (m - 1) * verify_slope`` full steps.
* ``weights``: analytic, for memory-bound GPU decoding: a step costs the weight bytes it reads, so a draft
  step costs ``1 - (skipped attention weights) / (all weights read per step)`` and a verify pass of a few
  tokens costs one step (``verify_slope = 0``).
* a JSON file written by ``CostModel.save`` (from an earlier run): the same numbers on every run and
  every rank, which is what makes reports reproducible.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rad_ds.decoding.skipping import candidate_layers
from rad_ds.models import RadHybridCache


@dataclass
class CostModel:
    kind: str
    attn_fraction: float  # step cost saved per skipped attention sublayer (fraction of a full step)
    verify_slope: float  # extra cost of each additional verified token (fraction of a full step)
    step_seconds: float | None = None  # one full decoding step, where measured

    def draft_step(self, k: int) -> float:
        return max(1.0 - k * self.attn_fraction, 0.05)

    def verify(self, m: int) -> float:
        return 1.0 + max(m - 1, 0) * self.verify_slope

    def estimated_speedup(self, k: int, accepted: int, drafted: int, rounds: int, tokens: int) -> float:
        """Plain decoding cost of ``tokens`` steps over the speculative cost of the same tokens:
        ``rounds`` verify passes of ``drafted/rounds + 1`` tokens and ``drafted`` draft steps."""
        if rounds == 0:
            return 0.0
        mean_drafted = drafted / rounds
        cost = drafted * self.draft_step(k) + rounds * self.verify(mean_drafted + 1)
        return tokens / cost

    def save(self, path: str | Path):
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        try:
            d = json.loads(Path(path).read_text())
            return cls(**{k: d[k] for k in ("kind", "attn_fraction", "verify_slope")},
                       step_seconds=d.get("step_seconds"))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--cost-model {path}: not a cost model file ({e}); use measured, weights or a "
                             "cost_model.json written by a diagnosis run") from None


def weights_cost_model(model) -> CostModel:
    """Analytic memory-bound model: cost of a step = bytes of weights it reads."""
    cands = candidate_layers(model.config)
    layers = model.model.layers
    attn = [sum(p.numel() for p in layers[i].self_attn.parameters()) for i in cands]
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.config.tie_word_embeddings:
        total += model.lm_head.weight.numel()
    frac = (sum(attn) / len(attn)) / total if attn else 0.0
    return CostModel(kind="weights", attn_fraction=frac, verify_slope=0.0)


@torch.no_grad()
def measure_cost_model(model, context: int = 128, draft_len: int = 4, reps: int = 5) -> CostModel:
    """Time one decoding step (full and with every candidate skipped) and a verify pass at ``context``."""
    cands = candidate_layers(model.config)
    dev = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0)).to(dev)

    def timed(n_new: int, skip) -> float:
        times = []
        for _ in range(reps + 1):
            cache = RadHybridCache(model.config)
            model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            snap = cache.snapshot()
            nxt = ids[:, -n_new:]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            model(nxt, cache=snap, use_cache=True, skip_layers=skip, logits_to_keep=n_new)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    step = timed(1, None)
    skip_all = timed(1, cands) if cands else step
    verify = timed(draft_len + 1, None)
    frac = max(step - skip_all, 0.0) / step / max(len(cands), 1)
    slope = max(verify - step, 0.0) / step / max(draft_len, 1)
    return CostModel(kind="measured", attn_fraction=frac, verify_slope=slope, step_seconds=step)


def resolve_cost_model(spec: str, model, context: int, draft_len: int) -> CostModel:
    if spec == "measured":
        return measure_cost_model(model, context=context, draft_len=draft_len)
    if spec == "weights":
        return weights_cost_model(model)
    if not Path(spec).is_file():
        raise ValueError(f"--cost-model {spec}: use measured, weights, or the path of a cost_model.json")
    return CostModel.load(spec)
