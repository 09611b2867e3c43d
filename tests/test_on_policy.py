"""On-policy distillation (GKD's lambda, ``on_policy.*``) against oracles.

* prompts and rows: a hand-worked packed micro-batch (document boundaries, prompt lengths, targets exactly
  on the generated tokens);
* the step schedule: a pure function of (seed, step) whose on-policy fraction is lambda;
* sampling: a batched, left-padded, cached ``generate`` gives each prompt the completion it gets alone;
* one on-policy step of the trainer == an independent oracle: the same completions from a hand-written
  sampling loop (full uncached forwards of the plain student, one prompt at a time) scored with the plain
  autograd KD loss on the plain teacher and student;
* resumed == uninterrupted with lambda 0.5; 2 ranks under ZeRO-3 == 1 process with lambda 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rad_ds.data.loader import MicroBatch
from rad_ds.distill.config import ConfigError
from rad_ds.distill.on_policy import (
    build_rows,
    cut_at_eos,
    extract_prompts,
    generate_completions,
    on_policy_step,
    sample_seed,
)
from tests.distill_helpers import (
    launcher,
    metrics,
    one_process_run,
    python,
    run,
    run_args,
    save_base,
    write_text_jsonl,
)
from tests.test_distill import L, _distill

OP_KEYS = ("loss", "kd", "hidden", "grad_norm", "lr", "onpolicy", "gen_tokens")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base whose EOS logit swings with the context (its tied embedding row scaled up), so completions
    end at different lengths and ranks finish generating at different steps; short documents, several per
    packed row of 64 tokens."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("on_policy")
    b = save_base(d)
    model = AutoModelForCausalLM.from_pretrained(b)
    with torch.no_grad():
        model.get_input_embeddings().weight[256] *= 40  # <|endoftext|>; tied to the LM head
    model.save_pretrained(b)
    return d, b, write_text_jsonl(d / "short.jsonl", n=48, max_words=6)


def _args(d, b, data, out, steps, *extra, **settings):
    return run_args(d, b, data, out, steps=steps, **settings) + list(map(str, extra))


def _rows_equal(rows, ref, steps, rel=1e-6):
    got, want = {r["step"]: r for r in rows}, {r["step"]: r for r in ref}
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        for k in OP_KEYS:
            if k in want[s]:
                assert got[s][k] == pytest.approx(want[s][k], rel=rel, abs=1e-9), (s, k)


# -- config ------------------------------------------------------------------------------------------------

def test_config_errors(base, tmp_path):
    d, b, data = base
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    good = _args(d, b, data, tmp_path / "o", 2)
    L.make_config(good + ["--on_policy.lmbda=0.5"]).validate()  # fine
    cases = [
        (["--on_policy.lmbda=1.5"], "on_policy.lmbda = 1.5 must be in [0, 1]"),
        (["--on_policy.lmbda=-0.1"], "on_policy.lmbda = -0.1 must be in [0, 1]"),
        (["--on_policy.max_new_tokens=0"], "on_policy.max_new_tokens = 0 must be >= 1"),
        (["--on_policy.min_prompt_tokens=0"], "on_policy.min_prompt_tokens = 0 must be >= 1"),
        (["--on_policy.temperature=-1"], "on_policy.temperature = -1.0 must be >= 0"),
        (["--on_policy.lmbda=0.5", "--loss.layerwise=true", "--loss.kd=none"], "with loss.layerwise=true"),
        (["--on_policy.lmbda=0.5", "--loss.ce_weight=0.1"], "set loss.ce_weight=0 or on_policy.lmbda=0"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=None) as e:
            L.make_config(good + extra).validate()
        assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    cfg = L.make_config(good + ["--on_policy.lmbda=0.5", "--loss.hidden_weight=0"])
    cfg.teacher.cache = str(cache)  # a cached teacher (top-k of the data's tokens) cannot score new tokens
    with pytest.raises(ConfigError, match="a cached teacher .teacher.cache. cannot score the student's new tokens"):
        cfg.validate()


# -- prompts, rows, schedule, sampling ----------------------------------------------------------------------

def _packed_micro_batch() -> MicroBatch:
    """Two packed rows of 16. Row 0: a chat-like document A (6 tokens, counted from position 3), plain text
    B (5 tokens, counted from 0), a 2-token document C, 3 padding positions. Row 1: a document D without a
    counted position, then E (4 tokens, counted at 1 and 2), padding."""
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 30, 31, 1, 1, 1],
                        [60, 61, 62, 63, 64, 70, 71, 72, 73, 1, 1, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
                        [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    token = torch.zeros(2, 16, dtype=torch.bool)
    token[0, :13] = token[1, :9] = True
    target = torch.zeros(2, 16, dtype=torch.bool)
    target[0, [3, 4, 6, 7, 8, 9, 11]] = True
    target[1, [6, 7]] = True
    return MicroBatch(ids, target, token, pos)


def test_prompts_and_rows_of_a_hand_worked_packed_batch():
    mb = _packed_micro_batch()
    prompts = extract_prompts(mb, rows=[7, 3], micro=1, min_prompt_tokens=3)
    got = [(p.row, p.doc, p.micro, p.ids.tolist()) for p in prompts]
    assert got == [
        (7, 0, 1, [10, 11, 12, 13]),  # A: up to and including its first counted position (3)
        (7, 1, 1, [20, 21, 22]),  # B: counted from 0, so min_prompt_tokens=3 tokens
        (7, 2, 1, [30]),  # C: never the document's last token
        (3, 1, 1, [70, 71, 72]),  # D has no counted position: no prompt; E: counted from 1 -> 3 tokens
    ]
    firsts = extract_prompts(mb, rows=[7, 3], micro=0, min_prompt_tokens=3, max_per_row=1)
    assert [(p.row, p.doc) for p in firsts] == [(7, 0), (3, 1)]

    eos, pad = 256, 1
    assert cut_at_eos(torch.tensor([40, 41, eos, pad, pad]), {eos, 2}).tolist() == [40, 41, eos]
    assert cut_at_eos(torch.tensor([50, 51]), {eos}).tolist() == [50, 51]
    rows = build_rows([(prompts[0].ids, torch.tensor([40, 41, eos])), (prompts[1].ids, torch.tensor([50, 51]))], pad)
    assert rows.input_ids.tolist() == [[10, 11, 12, 13, 40, 41, eos], [20, 21, 22, 50, 51, pad, pad]]
    # the positions that predict a generated token: 13->40, 40->41, 41->eos; 22->50, 50->51
    assert rows.target.tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]]
    assert rows.token.tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    assert rows.position_ids.tolist() == [list(range(7))] * 2


def test_schedule_is_a_function_of_seed_and_step():
    for lmbda in (0.2, 0.5):
        flags = [on_policy_step(0, s, lmbda) for s in range(1, 4001)]
        assert flags == [on_policy_step(0, s, lmbda) for s in range(1, 4001)]  # deterministic
        assert abs(np.mean(flags) - lmbda) < 0.03
    assert [on_policy_step(0, s, 0.5) for s in range(1, 200)] != [on_policy_step(1, s, 0.5) for s in range(1, 200)]
    assert not any(on_policy_step(3, s, 0.0) for s in range(1, 500))
    assert all(on_policy_step(3, s, 1.0) for s in range(1, 500))
    seeds = {sample_seed(0, step, row, doc) for step in range(1, 6) for row in range(20) for doc in range(4)}
    assert len(seeds) == 5 * 20 * 4 and sample_seed(0, 1, 2, 3) == sample_seed(0, 1, 2, 3)


def _tiny_hybrid():
    from rad_ds.models.conversion import from_hf_model
    from rad_ds.surgery import replace_attention
    from tests.model_factories import tiny_hf_model

    model = from_hf_model(tiny_hf_model("llama"))
    replace_attention(model, [1, 2])
    return model


def test_batched_sampling_equals_one_prompt_at_a_time():
    """Each prompt's completion depends on its seed only: not on its batch, its padding or its position in the
    batch (what lets 2 ranks generate what 1 process does); temperature 0 is greedy."""
    model = _tiny_hybrid().train()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g) for n in (5, 11, 3, 8)]
    seeds = [sample_seed(0, 1, r, 0) for r in range(4)]
    kw = dict(max_new_tokens=12, eos_ids={7}, pad_id=0, device="cpu")
    batched = generate_completions(model, prompts, seeds, temperature=1.0, **kw)
    assert model.training  # the model's mode is restored
    alone = [generate_completions(model, [p], [s], temperature=1.0, **kw)[0] for p, s in zip(prompts, seeds)]
    reordered = generate_completions(model, prompts[::-1], seeds[::-1], temperature=1.0, **kw)[::-1]
    for a, b, c in zip(batched, alone, reordered):
        assert a.tolist() == b.tolist() == c.tolist()
    other = generate_completions(model, prompts, [s + 1 for s in seeds], temperature=1.0, **kw)
    assert [c.tolist() for c in other] != [c.tolist() for c in batched]
    greedy = generate_completions(model, prompts[:1], seeds[:1], temperature=0.0, **kw)[0]
    seq = prompts[0]
    with torch.no_grad():
        for _ in range(12):
            nxt = model.eval()(seq[None]).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
            if int(nxt) == 7:
                break
    assert greedy.tolist() == seq[len(prompts[0]):].tolist()
    limited = generate_completions(model, prompts, seeds, temperature=1.0, vocab_limit=50, **kw)
    assert all(int(c.max()) < 50 for c in limited)
    # generation stops as soon as every row has written an EOS: here the first token always is one
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    ended = generate_completions(model, prompts, seeds, temperature=1.0, **{**kw, "eos_ids": set(range(320))})
    hook.remove()
    assert [len(c) for c in ended] == [1] * 4 and len(calls) == 1


# -- the trainer against an independent oracle ---------------------------------------------------------------

def _oracle_step_one(cfg):
    """Step 1 of an on-policy run by hand: plain models, prompts read off the packed rows, a sampling loop of
    full forwards (Gumbel-max with each prompt's own generator), the plain autograd KD loss."""
    from rad_ds.data import DistillLoader, build_packed
    from rad_ds.decoding.eos import model_eos_ids
    from rad_ds.distill.build import build_models
    from rad_ds.distill.losses import kd_loss_sum_ref

    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    models = build_models(cfg, location="replicated")
    student, teacher = models.student.eval(), models.teacher.eval()
    eos = model_eos_ids(models.tokenizer, student)
    op, lc = cfg.on_policy, cfg.loss
    loader = DistillLoader(build_packed(cfg.data, models.tokenizer), cfg.train.micro_batch, 1, 0, 1,
                           cfg.train.seed, cfg.data.shuffle)
    batch = loader.next_step()
    mb = batch.micro[0]
    total, lengths = 0.0, []
    with torch.no_grad():
        for r in range(mb.input_ids.size(0)):
            ids, pos, tgt = mb.input_ids[r], mb.position_ids[r].tolist(), mb.target[r].tolist()
            n = int(mb.token[r].sum())
            starts = [t for t in range(n) if pos[t] == 0]
            for doc, s in enumerate(starts):
                e = starts[doc + 1] if doc + 1 < len(starts) else n
                counted = [t - s for t in range(s, e) if tgt[t]]
                if not counted:
                    continue
                plen = min(max(counted[0] + 1, op.min_prompt_tokens), e - s - 1)
                seq = ids[s:s + plen]
                g = torch.Generator().manual_seed(sample_seed(cfg.train.seed, 1, int(batch.rows[r]), doc))
                for _ in range(op.max_new_tokens):
                    logits = student(seq[None]).logits[0, -1]
                    u = torch.rand(logits.numel(), generator=g)
                    nxt = torch.argmax(logits / op.temperature - torch.log(-torch.log(u)))
                    seq = torch.cat([seq, nxt[None]])
                    if int(nxt) in eos:
                        break
                mask = torch.zeros(1, len(seq), dtype=torch.bool)
                mask[0, plen - 1:len(seq) - 1] = True
                beta = lc.jsd_beta if lc.kd == "jsd" else lc.skew_alpha
                total += float(kd_loss_sum_ref(student(seq[None]).logits, teacher(seq[None]).logits, mask, lc.kd,
                                               lc.temperature, beta))
                lengths.append(len(seq) - plen)
    return total / sum(lengths), sum(lengths), lengths


@pytest.mark.parametrize("placement,kd,temperature", [("shared", "forward_kl", 1.0), ("zero3", "jsd", 0.7)],
                         ids=["one_copy", "teacher_engine"])
def test_on_policy_step_equals_independent_oracle(base, tmp_path, placement, kd, temperature):
    d, b, data = base
    args = _args(d, b, data, tmp_path / "run", 1, "--loss.hidden_weight=0", f"--loss.kd={kd}",
                 "--on_policy.lmbda=1", f"--on_policy.temperature={temperature}", "--on_policy.max_new_tokens=6",
                 f"--teacher.location={placement}")
    row = _distill(L.make_config(args)).losses[0]
    want, n_gen, lengths = _oracle_step_one(L.make_config(args))
    assert min(lengths) < 6 and 6 in lengths  # completions that end on EOS and ones cut at max_new_tokens
    assert row["onpolicy"] == 1 and row["gen_s"] > 0
    assert row["gen_tokens"] == n_gen
    assert row["kd"] == pytest.approx(want, rel=1e-5) and row["loss"] == pytest.approx(want, rel=1e-5)


def test_layerwise_first_stage_stays_off_policy(base, tmp_path):
    """With the two-stage recipe (loss.stage1_steps), the layer-wise first stage feeds the student's replaced
    layers the teacher's inputs: those steps stay off-policy, on-policy steps start after them (two engines,
    where the feed is a hook on the student's layers that generation must not meet)."""
    from rad_ds.distill.config import DistillConfig

    if "loss.stage1_steps" not in DistillConfig.keys():
        pytest.skip("no two-stage recipe (loss.stage1_steps) in this checkout")
    d, b, data = base
    rows = _distill(L.make_config(_args(d, b, data, tmp_path / "run", 4, "--loss.stage1_steps=2",
                                        "--on_policy.lmbda=1", "--on_policy.max_new_tokens=4",
                                        "--teacher.location=zero3"))).losses
    assert [r["onpolicy"] for r in rows] == [0, 0, 1, 1]
    assert all(r["gen_tokens"] > 0 for r in rows[2:])


# -- resume, 2 ranks --------------------------------------------------------------------------------------------

def test_resumed_equals_uninterrupted(base, tmp_path):
    """lambda=0.5, seed 0: steps 1, 2, 4, 5 are on-policy; 3 steps, stop, --resume auto, 3 steps == 6 steps."""
    d, b, data = base
    assert [on_policy_step(0, s, 0.5) for s in range(1, 7)] == [True, True, False, True, True, False]
    extra = ("--on_policy.lmbda=0.5", "--on_policy.max_new_tokens=6", "--checkpoint.every=2")
    straight = _distill(L.make_config(_args(d, b, data, tmp_path / "straight", 6, *extra)))
    args = _args(d, b, data, tmp_path / "resumed", 6, *extra)
    first = _distill(L.make_config(args + ["--train.stop_after=3"]))
    second = _distill(L.make_config(args + ["--resume", "auto"]))
    assert second.start_step == 3
    assert [r["onpolicy"] for r in straight.losses] == [1, 1, 0, 1, 1, 0]
    _rows_equal(first.losses + second.losses, straight.losses, range(1, 7))
    _rows_equal(metrics(tmp_path / "resumed"), straight.losses, range(1, 7))


def test_two_ranks_zero3_equal_one_process(base, tmp_path):
    """lambda=1 on 2 ranks under ZeRO-3 (every parameter partitioned, gather-free generation with synced_gpus)
    finishes without hanging and equals a 1-process run of the same global batch, step by step."""
    d, b, data = base
    extra = ["--on_policy.lmbda=1", "--on_policy.max_new_tokens=8", "--train.global_batch=4"]
    ref, _ = one_process_run(_args(d, b, data, tmp_path / "one", 3, *extra))
    r = run([python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             launcher("distill.py"), *_args(d, b, data, tmp_path / "two", 3, *extra)], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(tmp_path / "two")
    assert all(x["onpolicy"] == 1 and x["gen_tokens"] > 0 for x in rows)
    _rows_equal(rows, ref, range(1, 4), rel=1e-5)
