"""The expected-acceptance signal: alpha = sum min(p, q) against float64 definitions, the expected accepted length
against its closed form, the document estimator against the model's own forward, and the real sampling decoder's
acceptances against the alphas at the contexts it drafted in (a statistical test over many seeds, with power)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rad_ds.diagnosis import AcceptanceEstimator, SelfSpeculativeDecoder, SpecConfig
from rad_ds.diagnosis.signals import ExpectedSignal, acceptance_probability, expected_accepted_lengths
from rad_ds.models.conversion import from_hf_model
from tests.model_factories import sharpen, tiny_hf_model


def _np_softmax(x, t):
    z = np.asarray(x, dtype=np.float64) / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_alpha_is_one_minus_total_variation(temperature):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(64, 37, generator=g) * torch.linspace(0.1, 6, 64)[:, None]
    q = p + torch.randn(64, 37, generator=g) * torch.linspace(0, 3, 64)[:, None]
    tv = 0.5 * np.abs(_np_softmax(p, temperature) - _np_softmax(q, temperature)).sum(-1)
    got = acceptance_probability(p, q, temperature).numpy()
    np.testing.assert_allclose(got, 1.0 - tv, atol=2e-6, rtol=0)  # float32 softmax against the float64 definition
    assert np.ptp(got) > 0.3  # the rows really differ
    same = acceptance_probability(p.double(), p.double(), temperature)
    np.testing.assert_allclose(same.numpy(), 1.0, atol=1e-12)


def test_expected_accepted_length_definition_and_closed_form():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.2, 1.0, size=23)
    for g in (1, 3, 5):
        want = [sum(np.prod(a[t:t + j]) for j in range(1, g + 1)) for t in range(len(a) - g + 1)]
        got = expected_accepted_lengths(torch.tensor(a), g).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # a constant alpha: the geometric series of Leviathan et al., E[L] = (a - a^(g+1)) / (1 - a) accepted drafts
    for alpha, g in ((0.8, 4), (0.3, 2), (0.95, 8)):
        t = ExpectedSignal().totals(torch.full((200,), alpha, dtype=torch.float64), g)
        closed = (alpha - alpha ** (g + 1)) / (1 - alpha)
        assert t.accepted / t.rounds == pytest.approx(closed, rel=1e-12)
        assert t.accepted + t.rounds == pytest.approx(200)  # every round also yields the verifier's token
        assert t.alpha / t.positions == pytest.approx(alpha)


def _model(seed=0):
    torch.manual_seed(seed)
    m = sharpen(from_hf_model(tiny_hf_model("llama3", num_hidden_layers=4)), attn_scales=[1.0, 12.0, 0.5, 12.0])
    return m.double().eval()


def test_document_scores_equal_the_models_own_forward():
    """Teacher-forced documents: the estimator's alpha at every counted position equals 1 - TV of the full model's
    and the draft's softmax, each from a plain model forward (no prefix reuse), in float64 numpy."""
    model = _model()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(5, 300, (n,), generator=g) for n in (17, 9, 30)]
    counted = [torch.rand(d.numel(), generator=g) < 0.6 for d in docs]
    est = AcceptanceEstimator(model, documents=list(zip(docs, counted)), draft_len=3, signal="expected",
                              temperature=0.8)
    for mask in [(1,), (0, 3), (1, 2, 3)]:
        total_alpha, total_pos = 0.0, 0
        for s, (ids, c) in enumerate(zip(docs, counted)):
            with torch.no_grad():
                p = _np_softmax(model(ids[None]).logits[0], 0.8)
                q = _np_softmax(model(ids[None], skip_layers=mask).logits[0], 0.8)
            idx = c.clone()
            idx[-1] = False
            want = 1.0 - 0.5 * np.abs(p - q).sum(-1)[idx.numpy()]
            np.testing.assert_allclose(est.values(s, mask).numpy(), want, atol=1e-10)
            total_alpha, total_pos = total_alpha + want.sum(), total_pos + len(want)
        st = est.stats(mask)
        assert st.positions == total_pos and st.mean_alpha == pytest.approx(total_alpha / total_pos, abs=1e-10)


def _tested_positions(res, n_prompt):
    """(position in prompt + tokens whose prediction drafted the token, accepted?) for every drafted token the
    verifier tested: in a round with n accepted of d drafted, the first n and (if n < d) the rejected one."""
    out, pos = [], 0
    for n, d in zip(res.accepted, res.drafted):
        tested = n + 1 if n < d else d
        out += [(n_prompt + pos + j - 1, j < n) for j in range(tested)]
        pos += n + 1
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampling_decoder_accepts_at_the_expected_rate(temperature):
    """Each drafted token the real sampling decoder tests is accepted with probability alpha(context): the sum of
    acceptances minus the sum of alphas at those contexts (each from the estimator, teacher-forced on the decoder's
    own output) is a martingale with variance sum alpha (1 - alpha). Over 80 seeded runs |z| < 4; the same statistic
    with the alphas of another temperature, or with greedy agreement in place of alpha, is far outside."""
    model = _model(1)
    prompts = [torch.tensor([11, 42, 7]), torch.tensor([200, 3, 91, 150, 8])]
    mask = (1, 3)
    spec = SpecConfig(draft_len=3, max_new_tokens=20, sampling=True, temperature=temperature)
    dec = SelfSpeculativeDecoder(model, mask, spec)
    gen = torch.Generator().manual_seed(2024)
    hits, alphas, wrong_t, greedy = [], [], [], []
    for run in range(40):
        for p in prompts:
            res = dec.generate(p, generator=gen)
            ids = torch.cat([p, torch.tensor(res.tokens, dtype=torch.long)])
            tested = _tested_positions(res, p.numel())
            if not tested:
                continue
            counted = torch.ones(ids.numel(), dtype=torch.bool)
            docs = [(ids, counted)]
            vals = AcceptanceEstimator(model, documents=docs, signal="expected",
                                       temperature=temperature).values(0, mask)
            other = AcceptanceEstimator(model, documents=docs, signal="expected",
                                        temperature=temperature * 3).values(0, mask)
            agree = AcceptanceEstimator(model, documents=docs, signal="greedy").values(0, mask)
            for t, ok in tested:
                hits.append(float(ok))
                alphas.append(float(vals[t]))
                wrong_t.append(float(other[t]))
                greedy.append(float(agree[t]))
    hits, alphas = np.array(hits), np.array(alphas)
    assert len(hits) > 400 and 0.2 < hits.mean() < 0.95  # enough tested drafts, neither all accepted nor none

    def z(pred):
        pred = np.asarray(pred)
        return (hits.sum() - pred.sum()) / math.sqrt(max((pred * (1 - pred)).sum(), hits.var() * len(hits)))

    assert abs(z(alphas)) < 4, z(alphas)
    assert abs(z(wrong_t)) > 4, z(wrong_t)  # the test has power: a wrong temperature is rejected
    assert abs(z(greedy)) > 4, z(greedy)  # ... and so is argmax agreement standing in for alpha


def test_document_windows_are_disjoint_and_count_what_distillation_trains_on(tmp_path):
    """The diagnosis' documents: the search's windows and the held-out ones come from different documents; a text
    document counts every position but its window's last, a chat only the positions that predict its answer."""
    import json

    from transformers import AutoTokenizer

    from rad_ds.diagnosis.documents import document_windows
    from tests.model_factories import save_tiny_with_tokenizer

    base, _ = save_tiny_with_tokenizer(tmp_path, num_hidden_layers=2)
    tok = AutoTokenizer.from_pretrained(base)
    words = lambda i, n: " ".join(f"w{(13 * i + 7 * j) % 300}" for j in range(n))  # noqa: E731
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"doc{i} " + words(i, 20 + 9 * i)}) + "\n" for i in range(12)))
    w = document_windows(str(text), tok, tokens=120, held_out_tokens=60, seq_len=40, seed=3)
    assert w.documents == 12 and w.positions(w.search) >= 120 and w.positions(w.held_out) >= 60
    seen = [tok(f"doc{i} " + words(i, 20 + 9 * i)).input_ids + [tok.eos_token_id] for i in range(12)]
    for ids, counted in w.search + w.held_out:
        assert ids.numel() <= 40 and int(counted.sum()) == ids.numel() - 1 and not counted[-1]
        assert any(_is_window(ids.tolist(), s) for s in seen)  # a real window of one document
    src = lambda ws: {next(i for i, s in enumerate(seen) if _is_window(ids.tolist(), s)) for ids, _ in ws}  # noqa
    assert not src(w.search) & src(w.held_out)
    assert document_windows(str(text), tok, 120, 60, 40, seed=3).search[0][0].tolist() == w.search[0][0].tolist()

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": words(i, 9)},
                                                      {"role": "assistant", "content": words(i + 40, 6)}]}) + "\n"
                             for i in range(6)))
    c = document_windows(str(chats), tok, tokens=10, held_out_tokens=0, seq_len=256)
    for ids, counted in c.search:
        n = int(counted.sum())
        assert 6 <= n <= 8 < ids.numel() // 2  # the answer (and its end), not the prompt
        assert counted.nonzero().min() > ids.numel() // 2  # counted positions sit at the end, where the answer is


def _is_window(w: list[int], doc: list[int]) -> bool:
    n = len(w)
    return any(doc[a:a + n] == w for a in range(len(doc) - n + 1))


@pytest.mark.parametrize("kw, message", [
    ({"source": "documents"}, "set data"),
    ({"signal": "argmax"}, "signal"),
    ({"temperature": 0.0}, "temperature = 0.0"),
    ({"data": "no/such/file.jsonl"}, "data: no/such/file.jsonl not found"),
])
def test_diagnose_config_errors_name_the_setting(kw, message):
    from rad_ds.core.config import ConfigError
    from rad_ds.diagnosis.config import DiagnoseConfig

    with pytest.raises(ConfigError, match=message):
        DiagnoseConfig(model="m", out="o", **kw).validate()
    assert DiagnoseConfig(model="m", out="o", data="rad_ds/data/demo_text.jsonl").validate().scored_on == "documents"
    assert DiagnoseConfig(model="m", out="o").validate().scored_on == "continuations"
