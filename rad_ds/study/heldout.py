"""Held-out metrics of a student against its teacher, on data that neither selection nor training saw.

``HeldOut`` runs the teacher once over the held-out rows and prompts (its log-probabilities at every counted
position, its greedy continuations) and then scores any number of students against that reference:

* ``heldout_kl``: mean KL(teacher || student) per counted position (nats; the distillation objective, T = 1);
* ``ppl``: the student's perplexity on the held-out tokens (exp of the mean next-token cross-entropy);
* ``top1_agreement``: the fraction of counted positions where the student's argmax is the teacher's;
* ``greedy_agreement``: the fraction of the teacher's greedy continuation (``greedy_tokens`` per held-out
  prompt) that the student predicts token for token when fed that continuation, and ``greedy_prefix``: the mean
  length of the matching prefix (what a greedy speculative decoder with this student as draft would accept).

``TaskScores`` adds two generation tasks of the evaluation stage, scored on a student's final checkpoint and on the
teacher (``rad_ds.eval``: the same prompts, greedy decoding and scoring as ``launchers/evaluate.py``):

* ``arithmetic``: exact match on short arithmetic problems (``eval.arithmetic``), where the small base models score
  well above zero, so a student's loss of ability shows;
* ``passkey``: in-context retrieval of a key hidden at several depths of filler text (``eval.passkey``), overall and
  per context length (``passkey_by_context``): what a Mamba2 layer, with its fixed-size state, loses first.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from rad_ds.core.batching import left_padded, pad_id
from rad_ds.core.token_kl import log_probs, token_kl
from rad_ds.data import build_packed
from rad_ds.eval.arithmetic import ArithmeticTask
from rad_ds.eval.config import EvalConfig
from rad_ds.eval.passkey import PasskeyTask
from rad_ds.eval.run import run_generation_task


def scored_rows(data_cfg, path: str, tokenizer, rows: int):
    """The first ``rows`` packed rows of ``path`` (a held-out split), packed as ``data_cfg`` packs the training data
    but in file order: the rows ``HeldOut`` scores."""
    data = copy.deepcopy(data_cfg)
    data.path, data.max_documents, data.shuffle = path, None, False
    p = build_packed(data, tokenizer)
    return type(p)(p.input_ids[:rows], p.target[:rows], p.token[:rows], p.position_ids[:rows], p.n_documents,
                   p.n_split)


@dataclass
class _Prompt:
    ids: torch.Tensor  # (p,) the prompt
    continuation: torch.Tensor  # (m,) the teacher's greedy continuation


class HeldOut:
    def __init__(self, teacher, tokenizer, packed, prompts: list[torch.Tensor], greedy_tokens: int = 32,
                 micro_batch: int = 4):
        self.packed, self.micro_batch = packed, micro_batch
        self.n_rows = len(packed)
        self.ref_logp: list[torch.Tensor] = []  # per micro-batch: teacher log-probs at counted positions
        with torch.no_grad():
            for ids, pos, target, _ in self._batches():
                logits = teacher(ids, position_ids=pos).logits
                self.ref_logp.append(log_probs(logits[target]))
        self.prompts = _greedy_continuations(teacher, tokenizer, prompts, greedy_tokens)
        self.positions = int(sum(x.size(0) for x in self.ref_logp))

    def _batches(self):
        p = self.packed
        for a in range(0, self.n_rows, self.micro_batch):
            rows = np.arange(a, min(a + self.micro_batch, self.n_rows))
            ids = torch.from_numpy(p.input_ids[rows].astype(np.int64))
            pos = torch.from_numpy(p.position_ids[rows].astype(np.int64))
            target = torch.from_numpy(p.target[rows].astype(bool))
            nxt = torch.zeros_like(ids)
            nxt[:, :-1] = ids[:, 1:]
            yield ids, pos, target, nxt

    @torch.no_grad()
    def evaluate(self, student) -> dict:
        kl = ce = agree = 0.0
        for (ids, pos, target, nxt), t in zip(self._batches(), self.ref_logp, strict=True):
            s = log_probs(student(ids, position_ids=pos).logits[target])
            kl += float(token_kl(t, s))
            ce += float(-s.gather(-1, nxt[target].view(-1, 1)).sum())
            agree += float((s.argmax(-1) == t.argmax(-1)).sum())
        n = max(self.positions, 1)
        matched = total = prefix = 0
        if self.prompts:  # one right-padded batch: padding after a row's end changes nothing before it
            seqs = [torch.cat([pr.ids, pr.continuation]) for pr in self.prompts]
            ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
            logits = student(ids).logits
            for row, pr in zip(logits, self.prompts):
                p = pr.ids.numel()
                hits = (row[p - 1: p - 1 + pr.continuation.numel()].argmax(-1) == pr.continuation).tolist()
                matched, total = matched + sum(hits), total + len(hits)
                prefix += hits.index(False) if False in hits else len(hits)
        return {"heldout_kl": kl / n, "ppl": math.exp(ce / n), "top1_agreement": agree / n,
                "greedy_agreement": matched / max(total, 1), "greedy_prefix": prefix / max(len(self.prompts), 1),
                "positions": self.positions, "prompts": len(self.prompts)}


@torch.no_grad()
def _greedy_continuations(teacher, tokenizer, prompts: list[torch.Tensor], n: int) -> list[_Prompt]:
    """The teacher's greedy continuation of each prompt (up to and including its first EOS), in one left-padded
    batch."""
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    ids, mask = left_padded(prompts, pad)
    width = ids.size(1)
    out = teacher.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    result = []
    for p, row in zip(prompts, out[:, width:]):
        ends = (row == eos).nonzero() if eos is not None else []
        cont = row[: int(ends[0]) + 1] if len(ends) else row
        if cont.numel():
            result.append(_Prompt(p, cont))
    return result


class TaskScores:
    """Arithmetic and passkey accuracy of a model (the study's final students, and the teacher once)."""

    NAMES = (ArithmeticTask.name, PasskeyTask.name)  # the tasks it scores, in the results table's order

    def __init__(self, tokenizer, arithmetic_samples: int = 0, passkey_contexts=(), passkey_depths=(),
                 passkey_samples: int = 0, seed: int = 0, batch_size: int = 16):
        self.tok, self.chat = tokenizer, bool(getattr(tokenizer, "chat_template", None))
        self.cfg = EvalConfig(batch_size=batch_size, progress=False)  # the generation loop's settings
        self.tasks = []
        if arithmetic_samples:
            t = ArithmeticTask(samples=arithmetic_samples)
            self.tasks.append((t, t.load(None, None, seed)))
        if passkey_samples and passkey_contexts and passkey_depths:
            t = PasskeyTask(passkey_contexts, passkey_depths, passkey_samples)
            self.tasks.append((t, t.load(None, None, seed)))

    def __bool__(self) -> bool:
        return bool(self.tasks)

    @torch.no_grad()
    def evaluate(self, model, label: str = "student") -> dict:
        """``{"arithmetic", "arithmetic_n", "arithmetic_ci95", "passkey", "passkey_n", "passkey_ci95",
        "passkey_by_context": {context: accuracy}}`` for the tasks set up (Wilson intervals over the samples)."""
        out = {}
        for task, samples in self.tasks:
            rows, _ = run_generation_task(model, self.tok, task, samples, self.cfg, self.chat, 0, 1, None, label)
            if not rows[0]["n"]:  # nothing fitted the model (passkey contexts over its positions): no score
                continue
            out.update({task.name: rows[0]["score"], f"{task.name}_n": rows[0]["n"],
                        f"{task.name}_ci95": rows[0]["ci95"]})
            per_context = {str(r["context"]): r["score"] for r in rows[1:] if r.get("context") is not None}
            if per_context:
                out[f"{task.name}_by_context"] = per_context
        return out


__all__ = ["HeldOut", "TaskScores", "scored_rows"]
