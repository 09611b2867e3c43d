"""Vocab-parallel frozen embedding and LM head (``student.vocab_parallel``) on 2 ranks over gloo.

Oracles, each independent of the code under test: the gathered path on the same rank (``fused_loss_sums`` with
the whole head, ``nn.Embedding`` / ``F.linear`` on the whole matrix), and a single-process float64 computation
over both ranks' tokens from the divergences' plain ``reference`` (logits, log-softmax, autograd). Compared:
the embedding output, the head's logits, the KD and CE sums of every divergence and the gradients of a
trainable layer in front of the head, to 1e-6 in float32, with an uneven vocabulary (37 and 261 rows over 2
ranks) and ranks holding different numbers of tokens. End to end: a 2-step DeepSpeed ZeRO-3 one-copy
self-distillation (2 ranks, torchrun) equals the same run with the whole embedding and head (step 1 to
1e-6; after an Adam update to 1e-5).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from rad_ds.distill.config import ConfigError
from rad_ds.distill.divergences import REGISTRY, resolve
from rad_ds.distill.fused import fused_loss_sums
from rad_ds.distill.vocab_parallel import resolve_vocab_parallel, vocab_parallel_loss_sums
from rad_ds.models.vocab_parallel import VocabParallelEmbedding, VocabParallelHead, VocabShard
from tests.distill_helpers import launcher, metrics, python, run, run_args, save_base, write_text_jsonl
from tests.ports import free_port
from tests.test_distill import _final_state

H, TEMPERATURE, MIX, CHUNK = 16, 2.0, 0.3, 4
SHAPES = [(2, 7), (3, 5)]  # each rank's (batch, length): different token counts per rank
KINDS = sorted(REGISTRY)


def _inputs(vocab: int, rank: int) -> dict:
    """The shared weights (same seed on every rank) and rank ``rank``'s tokens, mask and inputs."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(vocab, H, generator=g)
    lin = torch.randn(H, H, generator=g) / H**0.5
    g = torch.Generator().manual_seed(100 + rank)
    b, length = SHAPES[rank]
    return {"w": w, "lin": lin, "x": torch.randn(b, length, H, generator=g),
            "t": torch.randn(b, length, H, generator=g), "ids": torch.randint(0, vocab, (b, length), generator=g),
            "mask": torch.rand(b, length, generator=g) > 0.25}


def _loss_and_grad(fn, inp, kind, **kw):
    """(kd sum, ce sum, gradient of the trainable ``lin``) of one loss function on one rank's inputs."""
    lin = inp["lin"].clone().requires_grad_()
    h = inp["x"] @ lin.t()
    out = fn(h, kw.pop("w"), inp["t"], kw.pop("tw"), inp["mask"], inp["ids"], kind, TEMPERATURE, MIX, CHUNK, **kw)
    (out["kd"] + 0.5 * out["ce"]).backward()
    return float(out["kd"]), float(out["ce"]), lin.grad


def _rank_results(rank: int, world: int, vocab: int) -> dict:
    inp = _inputs(vocab, rank)
    shard = VocabShard.of(vocab, rank, world)
    rows = inp["w"][shard.lo:shard.hi].clone()
    res = {"emb": VocabParallelEmbedding(rows, shard)(inp["ids"]),
           "emb_gathered": F.embedding(inp["ids"], inp["w"])}
    with torch.no_grad():
        res["logits"] = VocabParallelHead(rows, shard)(inp["x"])
    res["logits_gathered"] = F.linear(inp["x"], inp["w"])
    for kind in KINDS:
        res[kind] = _loss_and_grad(vocab_parallel_loss_sums, inp, kind, w=rows, tw=rows, shard=shard)
        res[kind + "_gathered"] = _loss_and_grad(fused_loss_sums, inp, kind, w=inp["w"], tw=inp["w"])
    return res


def _worker(rank: int, world: int, port: int, out: str, vocab: int) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(_rank_results(rank, world, vocab), Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", params=[37, 64], ids=["vocab37_uneven", "vocab64"])
def two_ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"vp{request.param}")
    mp.spawn(_worker, args=(2, free_port(), str(out), request.param), nprocs=2, join=True)
    return request.param, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _close(got, want):
    """Equal to 1e-6 of the largest entry (float32: the hidden-state gradients are sums over the vocabulary in
    another order, and the layer's gradient sums them over tokens, with cancellations)."""
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def _oracle(vocab: int, kind: str):
    """Single process, float64, both ranks' tokens, whole matrices, autograd through the divergence's
    ``reference``: (kd sum per rank, ce sum per rank, gradient of ``lin`` summed over ranks)."""
    div = resolve(kind, MIX)
    inputs = [_inputs(vocab, r) for r in range(2)]
    lin = inputs[0]["lin"].double().requires_grad_()
    w = inputs[0]["w"].double()
    kds, ces = [], []
    for inp in inputs:
        m = inp["mask"]
        zs, zt = F.linear(inp["x"].double() @ lin.t(), w), F.linear(inp["t"].double(), w)
        s, t = F.log_softmax(zs / TEMPERATURE, -1), F.log_softmax(zt / TEMPERATURE, -1)
        kds.append(div.reference(s[m], t[m]).sum() * TEMPERATURE**2)
        ce_at = m[:, :-1]  # position i predicts token i + 1; the last position has no target
        ces.append(F.cross_entropy(zs[:, :-1][ce_at], inp["ids"][:, 1:][ce_at], reduction="sum"))
    sum(k + 0.5 * c for k, c in zip(kds, ces)).backward()
    return [k.item() for k in kds], [c.item() for c in ces], lin.grad.float()


def test_embedding_and_head_equal_the_whole_matrix(two_ranks):
    _, ranks = two_ranks
    for res in ranks:  # exact: one rank holds each row, the other adds zeros
        assert torch.equal(res["emb"], res["emb_gathered"])
        torch.testing.assert_close(res["logits"], res["logits_gathered"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_kd_ce_loss_and_gradients_equal_gathered_and_oracle(two_ranks, kind):
    vocab, ranks = two_ranks
    kd_ref, ce_ref, grad_ref = _oracle(vocab, kind)
    for r, res in enumerate(ranks):
        kd, ce, grad = res[kind]
        kd_g, ce_g, grad_g = res[kind + "_gathered"]
        assert kd == pytest.approx(kd_g, rel=1e-6) and ce == pytest.approx(ce_g, rel=1e-6), (r, kd, kd_g, ce, ce_g)
        _close(grad, grad_g)
        assert kd == pytest.approx(kd_ref[r], rel=1e-6) and ce == pytest.approx(ce_ref[r], rel=1e-6)
    # data parallelism: the step's gradient is the sum of the ranks' (DeepSpeed averages, the trainer rescales)
    _close(ranks[0][kind][2] + ranks[1][kind][2], grad_ref)


def test_shard_rows_cover_the_vocabulary_once():
    for vocab, world in ((37, 2), (261, 2), (5, 4), (3, 4)):
        shards = [VocabShard.of(vocab, r, world) for r in range(world)]
        assert [s.lo for s in shards][0] == 0 and shards[-1].hi == vocab
        assert all(a.hi == b.lo for a, b in zip(shards, shards[1:]))
        assert sum(s.rows for s in shards) == vocab and max(s.rows for s in shards) == -(-vocab // world)


def test_forced_on_where_it_cannot_work_is_one_line_error():
    ok = dict(world=2, partitioned=True, shared=True, frozen=True, fused="auto", cache=False, vocab_limit=None)
    assert resolve_vocab_parallel("auto", **ok) == (True, None)
    assert resolve_vocab_parallel("false", **ok)[0] is False
    for change, words in ((dict(world=1), "one rank"), (dict(partitioned=False), "safetensors"),
                          (dict(shared=False), "teacher.location=shared"), (dict(frozen=False), "trainable"),
                          (dict(fused="false"), "loss.fused=false"), (dict(cache=True), "teacher.cache"),
                          (dict(vocab_limit=100), "loss.vocab=truncate")):
        on, why = resolve_vocab_parallel("auto", **{**ok, **change})
        assert not on and words in why
        with pytest.raises(ConfigError, match="student.vocab_parallel=true: .*" + words.split("=")[0]) as e:
            resolve_vocab_parallel("true", **{**ok, **change})
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_zero3_self_distillation_two_ranks_equals_whole_head(tmp_path):
    """2 ranks, ZeRO-3 one-copy self-distillation with KD + CE, vocabulary 261 (uneven over 2 ranks): the run
    with the vocab-parallel embedding and head equals the run with the whole (ZeRO-3-gathered) ones."""
    base = save_base(tmp_path, num_hidden_layers=4, vocab_size=261)
    text = write_text_jsonl(tmp_path / "text.jsonl", n=24)
    torchrun = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                launcher("distill.py")]
    outs = {}
    for mode in ("true", "false"):
        out = tmp_path / mode
        args = run_args(tmp_path, base, text, out, steps=2, checkpoint__every=2) + [
            "--layers", "1,3", "--loss.ce_weight=0.5", "--loss.chunk_tokens=16", f"--student.vocab_parallel={mode}"]
        r = run([*torchrun, *args], timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("vocab-parallel embedding and LM head" in r.stdout + r.stderr) == (mode == "true")
        outs[mode] = out
    got, want = metrics(outs["true"]), metrics(outs["false"])
    assert [row["step"] for row in got] == [1, 2] == [row["step"] for row in want]
    # step 1: the same weights, so loss terms and gradient norm to 1e-6; step 2 and the final weights follow one
    # Adam update, which divides by the gradients' magnitudes (1e-5, as the suite's other multi-step invariances)
    for (a, b), rel in zip(zip(got, want), (1e-6, 1e-5)):
        for k in ("loss", "kd", "ce", "hidden", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-9), (a["step"], k, a[k], b[k])
    final_vp, final_whole = _final_state(outs["true"] / "final"), _final_state(outs["false"] / "final")
    assert sorted(final_vp) == sorted(final_whole)
    diff = {k: float((final_vp[k] - v).abs().max()) for k, v in final_whole.items()}
    worst = {k: d for k, d in diff.items() if d > 1e-7 + 1e-5 * float(final_whole[k].abs().max())}
    assert not worst, worst
    assert json.loads((outs["true"] / "run_config.json").read_text())["student"]["vocab_parallel"] == "true"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_loss_on_cuda_equals_logits_path(dtype):
    """``scripts/gpu_check.sh`` runs the gpu-marked tests: the fused head + loss on CUDA (Liger's fused linear CE
    where it is installed, the torch path otherwise and for KD) against projecting to logits, every divergence."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from rad_ds.distill.fused import fused_loss_sums_ref

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1000, 64, generator=g) / 8).to("cuda", dtype)
    ids = torch.randint(0, 1000, (2, 96), generator=g).cuda()
    mask = torch.ones(2, 96, dtype=torch.bool, device="cuda")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for kind in [*KINDS, None]:
        h = torch.randn(2, 96, 64, generator=g).to("cuda", dtype).requires_grad_()
        t = torch.randn(2, 96, 64, generator=g).to("cuda", dtype)
        got = fused_loss_sums(h, w, t, w, mask, ids, kind, TEMPERATURE, MIX, 32)
        (gh,) = torch.autograd.grad(sum(got.values()), h)
        want = fused_loss_sums_ref(h, w, t, w, mask, ids, kind, TEMPERATURE, MIX, 32)
        (wh,) = torch.autograd.grad(sum(want.values()), h)
        for k in want:
            torch.testing.assert_close(got[k].float(), want[k].float(), **tol, msg=f"{kind} {k}")
        torch.testing.assert_close(gh.float(), wh.float(), **tol, msg=f"{kind} grad")
