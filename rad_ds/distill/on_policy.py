"""On-policy and mixed distillation (GKD's ``lmbda``): on a fraction of steps the student writes the tokens
it is trained on, and the teacher scores them.

GKD (Agarwal et al. 2024) trains on the student's own samples with probability lambda and on the data
otherwise, so the student learns what the teacher would do where its own generations go. Each step's batch
still comes from the one loader; on an on-policy step (:func:`on_policy_step`, a function of ``train.seed``
and the step number alone, the same on every rank, so every rank makes the same collectives):

1. every document of each packed row gives a prompt (:func:`extract_prompts`): its tokens up to and
   including the position of its first counted target (a chat: up to the first assistant token), at least
   ``min_prompt_tokens`` of them (plain text has no prompt: its first tokens are the prompt), never the
   document's last token;
2. the student completes all of this rank's prompts in one batched, left-padded ``generate`` with its
   hybrid cache. Under ZeRO-3 no rank holds the whole student: generation is gather-free (DeepSpeed fetches
   each layer's partitions as it runs, as in training), and with several ranks every rank calls
   ``generate(..., synced_gpus=True)``, which keeps them stepping together until all are done. The
   seconds it takes are logged per step (``gen_s``);
3. each prompt + completion is a row of its own (:func:`build_rows`: right-padded, position_ids 0..n-1);
   the logit losses count the positions that predict a generated token (the EOS too when one was
   produced), the hidden-state loss every real token. The global token counts take one all_reduce.

The teacher then scores these rows on the usual path (the one-copy forward or the teacher engine).

Sampling is the Gumbel-max trick with one generator per prompt, seeded by (``train.seed``, step, packed
row, document) (:func:`sample_seed`): argmax(logits / T + Gumbel noise) is an exact sample of
softmax(logits / T), and a prompt's completion does not depend on the batch it was generated in, the rank
it went to, or the number of ranks. The run's global RNG stream is never drawn from (generation also runs
inside ``torch.random.fork_rng``). So a resumed run, whose student weights are restored exactly,
regenerates the uninterrupted run's samples: they need no place in the checkpoint.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from rad_ds.core.batching import left_padded
from rad_ds.core.batching import pad_id as tokenizer_pad_id
from rad_ds.data.loader import MicroBatch, StepBatch
from rad_ds.data.sampler import ResumableSampler
from rad_ds.decoding.eos import model_eos_ids

_SCHEDULE, _SAMPLE = 0x4C4D4244, 0x53414D50  # tags that keep the two random streams apart


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether ``step`` is on-policy: true with probability ``lmbda``, a pure function of (seed, step)."""
    if lmbda <= 0:
        return False
    if lmbda >= 1:
        return True
    return bool(np.random.default_rng([_SCHEDULE, int(seed), int(step)]).random() < lmbda)


def sample_seed(seed: int, step: int, row: int, doc: int) -> int:
    """The sampling seed of the prompt from document ``doc`` of packed row ``row`` at ``step``."""
    state = np.random.SeedSequence([_SAMPLE, int(seed), int(step), int(row), int(doc)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


@dataclass
class Prompt:
    ids: torch.Tensor  # (n,) long
    micro: int  # the micro-batch of this rank it came from
    row: int  # its packed row (index into the packed data)
    doc: int  # its document's index within the row


def document_spans(position_ids: torch.Tensor, token: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each document of one packed row (position_ids restart at 0 at each document;
    the real tokens come first, padding after them)."""
    n = int(token.sum())
    starts = [0] + [int(i) for i in (position_ids[1:n] == 0).nonzero().flatten() + 1]
    return list(zip(starts, starts[1:] + [n]))


def extract_prompts(mb: MicroBatch, rows, micro: int, min_prompt_tokens: int,
                    max_per_row: int = 0) -> list[Prompt]:
    """The prompts of a packed micro-batch: per document, its tokens up to and including its first counted
    target, at least ``min_prompt_tokens`` of them, never its last token; documents without a counted
    target give none. ``rows``: the packed row index of each row; ``max_per_row`` > 0: the first that many
    documents of each row."""
    prompts = []
    for r in range(mb.input_ids.size(0)):
        taken = 0
        for d, (s, e) in enumerate(document_spans(mb.position_ids[r], mb.token[r])):
            counted = mb.target[r, s:e].nonzero().flatten()
            if not len(counted):
                continue
            n = max(min(max(int(counted[0]) + 1, min_prompt_tokens), e - s - 1), 1)
            prompts.append(Prompt(mb.input_ids[r, s:s + n].clone(), micro, int(rows[r]), d))
            taken += 1
            if max_per_row and taken == max_per_row:
                break
    return prompts


def cut_at_eos(generated: torch.Tensor, eos_ids) -> torch.Tensor:
    """A completion up to and including its first EOS (what ``generate`` wrote after it is padding)."""
    if eos_ids:
        hits = torch.isin(generated, torch.tensor(sorted(eos_ids), dtype=generated.dtype)).nonzero()
        if len(hits):
            return generated[: int(hits[0]) + 1]
    return generated


def build_rows(pairs: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> MicroBatch:
    """One row per (prompt, completion), right-padded: ``target`` on the positions that predict a completion
    token, ``token`` on the real tokens, position_ids 0..width-1 (one document per row)."""
    width = max(len(p) + len(c) for p, c in pairs)
    b = len(pairs)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    target = torch.zeros(b, width, dtype=torch.bool)
    token = torch.zeros(b, width, dtype=torch.bool)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.cat([p, c])
        token[i, :n] = True
        target[i, len(p) - 1:n - 1] = True  # position t predicts token t + 1
    position_ids = torch.arange(width).expand(b, width).clone()
    return MicroBatch(input_ids, target, token, position_ids)


class SeededSampler:
    """A logits processor: Gumbel-max sampling at ``temperature`` with one generator per batch row (on
    ``device``: a CPU and a GPU run draw different, equally valid samples), for ``generate`` with greedy
    decoding (0 = plain greedy); logits from ``vocab_limit`` on are never chosen."""

    def __init__(self, seeds: list[int], temperature: float, vocab_limit: int | None = None, device="cpu"):
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature, self.vocab_limit = temperature, vocab_limit

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        if self.vocab_limit is not None and self.vocab_limit < scores.size(-1):
            scores = scores.clone()
            scores[:, self.vocab_limit:] = -math.inf
        if self.temperature == 0:
            return scores
        return scores / self.temperature + gumbel_noise(self.gens, scores.size(-1)).to(scores.device)


def gumbel_noise(gens: list[torch.Generator], vocab: int) -> torch.Tensor:
    """``(len(gens), vocab)`` standard Gumbel noise, row ``i`` drawn from ``gens[i]`` (on its device)."""
    u = torch.stack([torch.rand(vocab, generator=g, device=g.device) for g in gens])
    return -torch.log(-torch.log(u))


@contextmanager
def zero3_forward_scope(model):
    """Let DeepSpeed ZeRO-3 find parameters a module reads outside its own forward (a Mamba2 mixer reads its
    ``conv1d`` weight directly) while ``model`` runs outside the engine's forward, as the engine's forward
    prologue does; a no-op without partitioned parameters."""
    if not any(hasattr(p, "ds_status") for p in model.parameters()):
        yield
        return
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict, ensure_zero_ordered_dict

    modules = list(model.modules())
    for m in modules:
        ensure_zero_ordered_dict(m)
        m._parameters._in_forward = True
    try:
        yield
    finally:
        for m in modules:
            if isinstance(m._parameters, ZeROOrderedDict):
                m._parameters._in_forward = False


class AllDone:
    """A stopping criterion: stop once every row of the batch has written an EOS after ``width`` prompt columns,
    on every rank (``synced``: one all_reduce per step), so all ranks stop at the same step. ``generate`` is
    given no EOS of its own: a rank that stopped alone would run ``synced_gpus``' dummy forwards, whose
    un-grown ``input_ids`` the hybrid model's cache slicing cannot take; tokens after a row's EOS are cut."""

    def __init__(self, width: int, eos_ids, synced: bool):
        self.width, self.eos, self.synced = width, torch.tensor(sorted(eos_ids), dtype=torch.long), synced

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        gen = input_ids[:, self.width:]
        flag = torch.isin(gen, self.eos.to(gen.device)).any(-1).all().to(torch.int32).reshape(1)
        if self.synced:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return flag.bool().expand(input_ids.size(0))


def generate_completions(model, prompts: list[torch.Tensor], seeds: list[int], max_new_tokens: int,
                         temperature: float, eos_ids, pad_id: int, device, vocab_limit: int | None = None,
                         synced: bool = False) -> list[torch.Tensor]:
    """The completion of each prompt (1-D, cut after its first EOS), in one left-padded batched ``generate``;
    ``synced``: every rank calls this together (ZeRO-3 on several ranks)."""
    ids, mask = left_padded(prompts, pad_id)
    width = ids.size(1)
    # eos_token_id=[]: no EOS stopping of generate's own (None would take the model's generation config's)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                           eos_token_id=[], pad_token_id=pad_id)
    device = torch.device(device)
    sample = LogitsProcessorList([SeededSampler(seeds, temperature, vocab_limit, device)])
    stop = StoppingCriteriaList([AllDone(width, eos_ids, synced)])
    was_training = model.training
    model.eval()  # also turns activation checkpointing off, which would drop the cache
    try:
        with torch.no_grad(), zero3_forward_scope(model), \
                torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=gen,
                                 logits_processor=sample, stopping_criteria=stop, synced_gpus=synced)
    finally:
        model.train(was_training)
    new = out[:, width:].cpu()
    return [cut_at_eos(new[i], eos_ids) for i in range(len(prompts))]


def generation_model(engine):
    """The causal LM inside a student engine: the one-copy wrapper's student, or the engine's module."""
    module = getattr(engine, "module", engine)
    return getattr(module, "student", module)


class OnPolicy:
    """Replaces the batch of an on-policy step by the student's completions of its prompts (collective on
    such steps: every rank takes them together). Steps up to ``after`` stay off-policy (a layer-wise first
    stage, where the student's layers are fed the teacher's inputs and sampling has nothing to teach).
    ``metrics()``: the step row's ``onpolicy``, ``gen_s`` and ``gen_tokens`` (nothing when ``lmbda`` is 0)."""

    def __init__(self, cfg, seed: int, model, tokenizer, device, rank: int = 0, world: int = 1,
                 vocab_limit: int | None = None, after: int = 0):
        self.cfg, self.seed, self.model, self.device = cfg, int(seed), model, torch.device(device)
        self.after = int(after)
        self.rank, self.world, self.vocab_limit = rank, world, vocab_limit
        self.eos_ids = model_eos_ids(tokenizer, model)
        self.pad_id = tokenizer_pad_id(tokenizer)
        self.last: dict = {}

    @property
    def enabled(self) -> bool:
        return self.cfg.lmbda > 0

    def maybe_replace(self, step: int, batch: StepBatch) -> StepBatch:
        if not self.enabled:
            return batch
        if step <= self.after or not on_policy_step(self.seed, step, self.cfg.lmbda):
            self.last = {"onpolicy": 0, "gen_s": 0.0, "gen_tokens": 0}
            return batch
        return self.replace(step, batch)

    def prompts(self, batch: StepBatch) -> list[Prompt]:
        """This rank's prompts of ``batch``, each with its packed row (the micro-batch's own record of its rows,
        else the loader's sharding of the global batch)."""
        shards = ResumableSampler.shard(batch.rows, self.rank, self.world, len(batch.micro))
        out = []
        for a, (mb, rows) in enumerate(zip(batch.micro, shards)):
            own = getattr(mb, "rows", None)
            rows = own if own is not None else rows
            if len(rows) != mb.input_ids.size(0):
                raise RuntimeError(f"on-policy: micro-batch {a} has {mb.input_ids.size(0)} rows but the sampler's "
                                   f"shard has {len(rows)}; the loader and the sampler disagree")
            out += extract_prompts(mb, rows, a, self.cfg.min_prompt_tokens, self.cfg.max_prompts_per_row)
        return out

    def replace(self, step: int, batch: StepBatch) -> StepBatch:
        cfg = self.cfg
        prompts = self.prompts(batch)
        seeds = [sample_seed(self.seed, step, p.row, p.doc) for p in prompts]
        t0 = time.perf_counter()
        completions = generate_completions(
            self.model, [p.ids for p in prompts], seeds, cfg.max_new_tokens, cfg.temperature, self.eos_ids,
            self.pad_id, self.device, self.vocab_limit, synced=self.world > 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        gen_s = time.perf_counter() - t0
        micro = []
        for a in range(len(batch.micro)):
            pairs = [(p.ids, c) for p, c in zip(prompts, completions) if p.micro == a]
            if not pairs:
                raise RuntimeError(f"on-policy step {step}: micro-batch {a} has no document with a counted target")
            micro.append(build_rows(pairs, self.pad_id))
        counts = torch.tensor([sum(int(m.target.sum()) for m in micro), sum(int(m.token.sum()) for m in micro)],
                              dtype=torch.long, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(counts)
        n_target, n_token = (int(x) for x in counts.cpu())
        self.last = {"onpolicy": 1, "gen_s": gen_s, "gen_tokens": n_target}
        return StepBatch(micro=micro, n_target=n_target, n_token=n_token, rows=batch.rows)

    def metrics(self) -> dict:
        return dict(self.last) if self.enabled else {}


__all__ = ["OnPolicy", "Prompt", "SeededSampler", "build_rows", "cut_at_eos", "document_spans", "extract_prompts",
           "generate_completions", "generation_model", "on_policy_step", "sample_seed"]
