"""The offline teacher cache, against oracles: the online teacher (a cache with k = vocab in float32 gives the
same losses, gradient norms and weights as running the teacher), a direct computation of the sparse objective
(small k, written out here from the teacher's full logits), an uninterrupted build (a build killed after a shard
resumes to the same bytes), and a 1-process build (2 ranks over a ZeRO-3 teacher engine give the same shards).
Caches made for other inputs are refused with one line."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
import torch

from rad_ds.data.teacher_store import TeacherCacheError, TeacherCacheStore
from tests.distill_helpers import (
    free_port,
    launcher,
    load_launcher,
    python,
    run,
    run_args,
    save_base,
    teacher_ds_config,
    write_chat_jsonl,
)

L = load_launcher("distill")
C = load_launcher("teacher_cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher_cache")
    save_base(d, name="other", num_hidden_layers=5, seed=4)
    return d, save_base(d), write_chat_jsonl(d / "chat.jsonl", n=40)


def _cache_args(base_dir, data, out, k, **settings):
    args = ["--teacher", str(base_dir), "--data", str(data), "--seq-len", "64", "--k", str(k), "--out", str(out),
            "--progress=false", "--rows_per_shard=4"]
    return args + [f"--{key}={v}" for key, v in settings.items()]


def _build(base_dir, data, out, k, **settings):
    from rad_ds.teacher_cache.run import build_teacher_cache

    cfg = C.cli.parse_config(C.cli.TeacherCacheConfig, _cache_args(base_dir, data, out, k, **settings), None,
                             C.cli.FLAGS)
    return build_teacher_cache(cfg)


def _run_cfg(tmp_path, base_dir, data, out, **settings):
    # the published mapping: a student far from its teacher, so the losses compared below are not tiny
    s = {"loss.hidden_weight": 0, "loss.temperature": 2.0, "student.init": "attention", **settings}
    return L.make_config(run_args(tmp_path, base_dir, data, out, steps=4, **s))


def _shards(root) -> dict:
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted((root / "shards").glob("*.safetensors"))}


def test_full_k_cache_equals_online_teacher(base, tmp_path):
    """k = vocab in float32: the cached run's losses, gradient norms and final weights equal the run with the
    teacher online (one-copy self-distillation), chat data with masked prompts, temperature 2."""
    from rad_ds.distill import distill
    from rad_ds.models import RadHybridForCausalLM

    d, b, data = base
    summary = _build(b, data, tmp_path / "cache", k=10_000, values_dtype="float32", temperature=2.0)
    assert summary.k == 320 and summary.positions > 0  # k clipped to the vocabulary
    online = distill(_run_cfg(tmp_path, b, data, tmp_path / "online"))
    cached = distill(_run_cfg(tmp_path, b, data, tmp_path / "cached", **{"teacher.cache": tmp_path / "cache"}))
    assert cached.summary["teacher_location"] == "cache" and online.summary["teacher_location"] == "shared"
    for a, c in zip(online.losses, cached.losses, strict=True):  # float32 round-off of two summation orders
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    wa = RadHybridForCausalLM.from_pretrained(str(tmp_path / "online" / "final")).state_dict()
    wc = RadHybridForCausalLM.from_pretrained(str(tmp_path / "cached" / "final")).state_dict()
    # Adam normalises each element's step (lr 3e-3 a step), so on elements whose gradient is ~0 the round-off
    # above grows to a small fraction of one step; a wrong teacher signal moves weights by whole steps
    for key in wa:
        torch.testing.assert_close(wc[key], wa[key], rtol=0, atol=2e-4)


def _direct_sparse_objective(student_logits, teacher_logits, mask, k, kind, temperature):
    """The sparse objective written out in float64: teacher's top-k + tail bucket, student collapsed onto them."""
    t = torch.log_softmax(teacher_logits.double() / temperature, -1)[mask]
    s = torch.log_softmax(student_logits.double() / temperature, -1)[mask]
    top, idx = t.topk(k, -1)
    t_b = torch.cat([top.exp(), (1 - top.exp().sum(-1, keepdim=True)).clamp_min(0)], -1)
    s_top = s.gather(-1, idx).exp()
    s_b = torch.cat([s_top, (1 - s_top.sum(-1, keepdim=True)).clamp_min(1e-300)], -1)
    if kind == "reverse_kl":
        d = (s_b * (s_b.log() - t_b.log())).sum(-1)
    else:
        d = (t_b * (t_b.log() - s_b.log())).sum(-1)
    return float(d.sum() * temperature ** 2)


def test_small_k_loss_equals_direct_sparse_objective(base, tmp_path):
    """k = 8: the first step's loss of a cached run equals the sparse objective computed here from the plain
    teacher's full logits and the untrained student (reverse KL: finite thanks to the tail bucket)."""
    from rad_ds.data import DistillLoader, build_packed
    from rad_ds.distill import distill
    from rad_ds.distill.build import build_models
    from rad_ds.distill.losses import token_divergence

    d, b, data = base
    _build(b, data, tmp_path / "cache", k=8, values_dtype="float32", temperature=2.0)
    cfg = _run_cfg(tmp_path, b, data, tmp_path / "run", **{"teacher.cache": tmp_path / "cache",
                                                           "loss.kd": "reverse_kl"})
    first = distill(cfg).losses[0]["loss"]

    ref_cfg = _run_cfg(tmp_path, b, data, tmp_path / "ref")
    ref_cfg.validate()
    torch.manual_seed(ref_cfg.train.seed)
    models = build_models(ref_cfg, location="replicated")
    loader = DistillLoader(build_packed(ref_cfg.data, models.tokenizer), 2, 1, 0, 1, ref_cfg.train.seed, True)
    mb = loader.next_step().micro[0]
    with torch.no_grad():
        t = models.teacher(mb.input_ids, position_ids=mb.position_ids).logits
        s = models.student(mb.input_ids, position_ids=mb.position_ids).logits
    n = int(mb.target.sum())
    want = _direct_sparse_objective(s, t, mb.target, 8, "reverse_kl", 2.0) / n
    dense = float(token_divergence(s[mb.target], t[mb.target], "reverse_kl", 2.0).sum()) / n
    # the teacher's float32 logits of a 4-row cache forward and a 2-row forward differ by round-off (~1e-7 per
    # token of loss); the sparse objective itself differs from the full-vocabulary one by far more
    assert math.isfinite(first) and first == pytest.approx(want, rel=1e-4)
    assert abs(dense - want) > 100 * 1e-4 * want


def test_killed_build_resumes_to_the_same_bytes(base, tmp_path):
    """SIGKILL after shard 1: the manifest stays unfinished, a run that reads it is refused; the same command
    finishes it, and every shard equals an uninterrupted build's."""
    d, b, data = base
    args = _cache_args(b, data, tmp_path / "killed", 16)
    p = run([python(), launcher("teacher_cache.py"), *args], RAD_DS_FAULT="kill@cache_after_shard:step=1")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["status"] == "writing"
    assert {"shard-00000.safetensors", "shard-00001.safetensors"} <= set(_shards(tmp_path / "killed"))
    with pytest.raises(TeacherCacheError, match="unfinished"):
        TeacherCacheStore.open(tmp_path / "killed")
    p = run([python(), launcher("teacher_cache.py"), *args])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "teacher cache" in p.stdout and "bytes/position" in p.stdout
    _build(b, data, tmp_path / "whole", k=16)
    got, want = _shards(tmp_path / "killed"), _shards(tmp_path / "whole")
    assert sorted(got) == sorted(want) and len(want) > 2
    for name in want:
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (name, key)
    m = TeacherCacheStore.open(tmp_path / "killed").manifest
    assert m["fingerprint"]["values_dtype"] == "float16" and m["totals"]["bytes_per_position_nominal"] == 16 * 4 + 4


def test_mismatched_inputs_are_refused(base, tmp_path):
    """One line naming what differs: another data.seq_len, temperature, teacher, loss terms the cache cannot
    give, a rebuild with another k into the same directory."""
    from rad_ds.distill import distill
    from rad_ds.distill.config import ConfigError

    d, b, data = base
    _build(b, data, tmp_path / "cache", k=16, temperature=2.0)
    cache = {"teacher.cache": tmp_path / "cache"}
    cases = [
        ({"data.seq_len": 48}, "data.seq_len"),
        ({"loss.temperature": 1.0}, "temperature"),
        ({"teacher.path": d / "other"}, "teacher architecture"),
    ]
    for settings, what in cases:
        with pytest.raises(TeacherCacheError, match=what):
            distill(_run_cfg(tmp_path, b, data, tmp_path / "run", **cache, **settings))
        assert not (tmp_path / "run").exists()  # nothing left behind
    with pytest.raises(ConfigError, match="hidden_weight"):
        _run_cfg(tmp_path, b, data, tmp_path / "run", **cache, **{"loss.hidden_weight": 0.5}).validate()
    with pytest.raises(TeacherCacheError, match="k 16"):
        _build(b, data, tmp_path / "cache", k=8, temperature=2.0)
    # a directory that is not a cache is refused before anything (the packed data/ included) is written into it
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    from rad_ds.core.outputs import OutputError

    with pytest.raises(OutputError, match="holds files that rad-ds did not write"):
        _build(b, data, foreign, k=8)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    p = run([python(), launcher("distill.py"), *run_args(tmp_path, b, data, tmp_path / "run2", **cache,
                                                        **{"loss.hidden_weight": 0, "data.seq_len": 48})])
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("error: teacher.cache") and "data.seq_len" in last, p.stderr[-2000:]
    assert not (tmp_path / "run2").exists()


def test_two_rank_zero3_build_and_cached_run_match_one_process(base, tmp_path):
    """2 ranks with a ZeRO-3 teacher engine (shards dealt to the ranks) write the shards of a 1-process
    replicated build; a 2-rank run reading the cache follows the 1-process cached run step by step."""
    from rad_ds.distill import distill

    d, b, data = base
    _build(b, data, tmp_path / "one", k=16, values_dtype="float32", temperature=2.0)
    torchrun = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    args = _cache_args(b, data, tmp_path / "two", 16, values_dtype="float32", temperature=2.0,
                       **{"teacher.location": "zero3", "teacher.deepspeed": teacher_ds_config(tmp_path)})
    p = run([*torchrun, launcher("teacher_cache.py"), *args])
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = _shards(tmp_path / "two"), _shards(tmp_path / "one")
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name]["indices"], want[name]["indices"]), name
        torch.testing.assert_close(got[name]["logp"], want[name]["logp"], rtol=1e-5, atol=1e-5)

    one = distill(_run_cfg(tmp_path, b, data, tmp_path / "run1", **{"teacher.cache": tmp_path / "two"}))
    args = run_args(tmp_path, b, data, tmp_path / "run2", steps=4, **{
        "loss.hidden_weight": 0, "loss.temperature": 2.0, "teacher.cache": tmp_path / "two", "train.micro_batch": 1,
        "student.init": "attention"})
    p = run([*torchrun, launcher("distill.py"), *args])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    for a, c in zip(one.losses, rows, strict=True):
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_store_reads_rows_in_mask_order(tmp_path):
    """The reader puts every stored position back where the mask says, row by row (uint16 indices, float16)."""
    fp = {"teacher_config": "c", "teacher_weights": "w", "tokenizer": "t", "seq_len": 6, "rows": 3, "data": "d",
          "k": 2, "temperature": 1.0, "vocab_size": 70000, "values_dtype": "float16"}
    store = TeacherCacheStore.create(tmp_path / "c", fp, rows_per_shard=2, write=True)
    target = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    counts = target.sum(-1).numpy()
    n = int(counts.sum())
    idx = torch.arange(2 * n).view(n, 2) + 65530  # beyond uint16: the store picks int32 for vocab 70000
    logp = -torch.arange(2 * n, dtype=torch.float32).view(n, 2) / 4
    tail = -torch.arange(n, dtype=torch.float32) - 10
    store.write_shard(0, np.array([0, 2, 4]), idx[:4], logp[:4], tail[:4])
    store.write_shard(1, np.array([0, 0]), idx[4:], logp[4:], tail[4:])
    store.finalize({"rows": 3, "positions": n})
    # a micro-batch of packed rows 1, 0, 2: row 1's entries (2, 3) at positions 0 and 5, row 0's (0, 1) at 1 and 2
    back = TeacherCacheStore.open(tmp_path / "c").targets(np.array([1, 0, 2]), target[[1, 0, 2]])
    expected = {(0, 0): 2, (0, 5): 3, (1, 1): 0, (1, 2): 1}
    for (b_row, pos), i in expected.items():
        assert torch.equal(back.indices[b_row, pos], idx[i]) and back.tail[b_row, pos] == tail[i]
        torch.testing.assert_close(back.logp[b_row, pos], logp[i].half().float())
    filled = {(r, q) for r in range(3) for q in range(6) if back.indices[r, q].any()}
    assert filled == set(expected) and back.indices.dtype == torch.int64
    with pytest.raises(TeacherCacheError, match="other data"):  # three counted positions where two are stored
        TeacherCacheStore.open(tmp_path / "c").targets(np.array([1]), torch.tensor([[1, 1, 0, 0, 0, 1]]).bool())
