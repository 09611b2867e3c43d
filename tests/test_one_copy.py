"""One-copy self-distillation and ZeRO-3 construction, against the two-engine path.

The oracle of ``teacher.location=shared`` (the teacher is the student's own stack with the original
attention at the replaced layers) is the two-engine run (``teacher.location=zero3``: a separate teacher
engine): losses, gradient norms and final weights equal to 1e-6 in fp32, on 1 process and on 2 ranks, across
a resume. The ZeRO-3 construction (models created partitioned, filled tensor by tensor from safetensors) is
checked on 2 ranks against the whole-model build, value by value, with the whole-model loaders disabled.
The up-front checks (teacher size, placement, hidden size) fail before any weights load.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.distill_helpers import (
    ds_config,
    free_port,
    launcher,
    metrics,
    one_process_run,
    python,
    run,
    run_args,
    save_base,
    six_step_args,
    write_text_jsonl,
)
from tests.test_distill import L, _cli, _distill, _final_state

KEYS = ("loss", "kd", "hidden", "grad_norm", "lr")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("one_copy")
    return d, save_base(d, num_hidden_layers=5), write_text_jsonl(d / "text.jsonl", n=48)


def _rows_equal(rows, ref, steps, rel=1e-6):
    got, want = {r["step"]: r for r in rows}, {r["step"]: r for r in ref}
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        for k in KEYS:
            if k in want[s]:
                assert got[s][k] == pytest.approx(want[s][k], rel=rel, abs=1e-9), (s, k)


def _weights_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("extra", [[], ["--loss.layerwise=true", "--loss.kd=none", "--loss.hidden_weight=1"]],
                         ids=["kd_hidden", "layerwise"])
def test_one_copy_equals_two_engines_with_resume(base, tmp_path, extra):
    d, b, text = base
    args = run_args(d, b, text, None, steps=5, checkpoint__every=1) + ["--layers", "2,4"] + extra

    def cfg(out, *more):
        return L.make_config([*args, "--out", str(out), *more])

    two = _distill(cfg(tmp_path / "two", "--teacher.location=zero3"))
    assert two.summary["teacher_location"] == "zero3"
    # one copy, interrupted after 3 steps and resumed: the same steps as the uninterrupted two-engine run
    first = _distill(cfg(tmp_path / "one", "--train.stop_after=3"))
    assert first.summary["teacher_location"] == "shared"  # auto picks one copy for self-distillation
    rest = _distill(cfg(tmp_path / "one", "--resume", "auto"))
    assert rest.start_step == 3
    _rows_equal(first.losses + rest.losses, two.losses, range(1, 6))
    _rows_equal(metrics(tmp_path / "one"), two.losses, range(1, 6))
    _weights_equal(_final_state(rest.export), _final_state(two.export))
    # the engine holds one copy: the student's parameters plus the replaced layers' original attention only
    mod = rest.engine.module
    attn = sum(p.ds_numel for p in mod.teacher_attention.parameters())
    student = sum(p.ds_numel for p in mod.student.parameters())
    per_layer = sum(p.ds_numel for p in mod.student.model.layers[0].self_attn.parameters())
    assert attn == 2 * per_layer and student > 5 * attn
    assert not any(k.startswith("teacher_attention") for k in _final_state(rest.export))


@pytest.mark.slow
def test_one_copy_two_ranks_resumed_equals_two_engines_one_process(base, tmp_path):
    d, b, text = base
    ref_rows, ref_final = one_process_run(six_step_args(d, b, text, tmp_path / "ref", "--layers", "2,4",
                                                        "--teacher.location=zero3"))
    # the whole (gathered) head, as the reference has: this pins one copy == two engines bit for bit;
    # tests/test_vocab_parallel.py pins the vocab-parallel head against it
    args = six_step_args(d, b, text, tmp_path / "two", "--layers", "2,4", "--teacher.location=shared",
                         "--student.vocab_parallel=false")
    torchrun = [python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                launcher("distill.py")]
    r = run([*torchrun, *args, "--train.stop_after=4"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([*torchrun, *args, "--resume", "auto"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps 4..6 of 6" in r.stdout
    _rows_equal(metrics(tmp_path / "two"), ref_rows, range(1, 7), rel=1e-5)
    final = _final_state(tmp_path / "two" / "final")
    for k, v in ref_final.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-7, msg=k)


BUILD_SCRIPT = r'''
import json, math, sys
import torch
import rad_ds.distill.build as build  # build_models calls its load_model
from rad_ds.core.dist import init_distributed
from rad_ds.distill.build import build_models
from rad_ds.engine.engines import fill_ds_config, load_ds_config, plan_batch
from tests.test_distill import L

cfg = L.make_config(json.loads(sys.argv[1]))
info = init_distributed(120, deepspeed=True)
plan = plan_batch(cfg.train, info.world)
s_ds = fill_ds_config(load_ds_config(cfg.deepspeed), plan, cfg.model.dtype, cfg.deepspeed)
t_ds = fill_ds_config(load_ds_config(cfg.teacher.deepspeed), plan, cfg.model.dtype, cfg.teacher.deepspeed,
                      optimizer=False)
whole = build.load_model
def refuse(*a, **k):
    raise AssertionError("a whole model was loaded")
build.load_model = refuse
shared = build_models(cfg, s_ds, t_ds, info.world, info.world)
cfg.teacher.location = "zero3"
two = build_models(cfg, s_ds, t_ds, info.world, info.world)
build.load_model = whole
plain = build_models(cfg, location="replicated")
import deepspeed
want = {**plain.student.state_dict(), **{"T." + k: v for k, v in plain.teacher.state_dict().items()}}
for i in plain.replaced_layers:
    for k, v in plain.teacher.model.layers[i].self_attn.state_dict().items():
        want[f"A.{i}.{k}"] = v
got, whole_params = {}, []
named = [*shared.student.student.named_parameters(), *(("T." + k, p) for k, p in two.teacher.named_parameters()),
         *((f"A.{k}", p) for k, p in shared.student.teacher_attention.named_parameters())]
for name, p in named:
    if p.ds_tensor.numel() != math.ceil(p.ds_numel / info.world):
        whole_params.append(name)
    with deepspeed.zero.GatheredParameters([p]):
        got[name] = p.data.clone()
diff = {k: float((got[k] - want[k]).abs().max()) for k in got}
if info.rank == 0:
    print("RESULT " + json.dumps({"diff": diff, "whole": whole_params, "n": len(got),
                                  "placements": [shared.location.kind, two.location.kind],
                                  "partitioned": [shared.partitioned, two.partitioned]}))
'''


def test_zero3_construction_two_ranks_no_whole_model(base, tmp_path):
    """Student, one-copy teacher attention and a ZeRO-3 teacher created partitioned on 2 ranks with every
    whole-model loader disabled; gathered, each value equals the whole-model build's."""
    d, b, text = base
    args = run_args(d, b, text, tmp_path / "o", steps=1) + ["--layers", "2,4"]
    script = tmp_path / "build.py"
    script.write_text(BUILD_SCRIPT)
    r = run([python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "--master_port", str(free_port()), script, json.dumps(args)], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["placements"] == ["shared", "zero3"] and res["partitioned"] == [True, True]
    assert res["whole"] == [] and res["n"] > 40
    assert max(res["diff"].values()) == 0.0, {k: v for k, v in res["diff"].items() if v}


def test_up_front_checks_fail_before_any_weights_load(base, tmp_path, capsys, monkeypatch):
    d, b, text = base
    import rad_ds.distill.build as build

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the check")

    wide = save_base(tmp_path, name="wide", num_hidden_layers=5, hidden_size=96, num_attention_heads=6,
                     num_key_value_heads=2)
    big = save_base(tmp_path, name="big", num_hidden_layers=5, intermediate_size=256)
    stage2 = ds_config(tmp_path, name="teacher_stage2.json", stage=2)
    good = run_args(tmp_path, b, text, tmp_path / "good", steps=1)
    monkeypatch.setattr(build, "load_model", refuse)
    cases = [
        (["--teacher", wide], "has hidden size 96 and the student 64; set loss.hidden_weight=0"),
        (["--teacher", big, "--teacher.location=replicated", "--teacher.device_memory_gb=0.0001"],
         "teacher.location=replicated: the teacher's weights take"),
        (["--teacher", big, "--teacher.location=zero3", "--teacher.device_memory_gb=0.0001"],
         "add teacher.offload=true"),
        (["--teacher.location=zero3", "--teacher.deepspeed", stage2], "has zero_optimization.stage 2"),
        (["--teacher", big, "--teacher.location=shared"], "teacher.location=shared needs self-distillation"),
        (["--teacher.offload=true", "--teacher.location=replicated"], "teacher.offload needs teacher.location=zero3"),
    ]
    for extra, message in cases:
        rc, line = _cli(good + [str(x) for x in extra], capsys)
        assert rc == 2 and line.startswith("error:") and message in line, (message, line)
        assert not (tmp_path / "good").exists()


def test_auto_placement_by_size(base, tmp_path):
    from rad_ds.distill.teacher_location import param_count, resolve_location
    from rad_ds.models.conversion import load_config

    d, b, text = base
    big = save_base(tmp_path, name="big", num_hidden_layers=5, intermediate_size=256)
    tcfg = load_config(big)
    nbytes = param_count(tcfg) * 4
    stage3 = {"zero_optimization": {"stage": 3}}

    def kind(gb, world=2):
        cfg = L.make_config(run_args(tmp_path, b, text, tmp_path / "o") + ["--teacher", str(big),
                                                                           f"--teacher.device_memory_gb={gb}"])
        return resolve_location(cfg, False, tcfg, stage3, world, world)

    fits = kind(nbytes * 4.01 / 2**30)  # a quarter of the device or less: replicated
    assert fits.kind == "replicated" and fits.per_rank_bytes == nbytes
    sharded = kind(nbytes * 3.9 / 2**30)
    assert sharded.kind == "zero3" and sharded.per_rank_bytes == math.ceil(nbytes / 2)


def test_sources_of_a_gguf_file_path(tmp_path):
    """``--model path/to/file.gguf``: its config and tokenizer are read from the file, before any weights."""
    import os

    from rad_ds.distill.build import read_sources
    from rad_ds.models.conversion import smollm2_gguf

    d, f = smollm2_gguf()
    data = write_text_jsonl(tmp_path / "text.jsonl", n=8)
    cfg = L.make_config(run_args(tmp_path, os.path.join(d, f), data, tmp_path / "o", steps=1) + ["--layers", "22,25"])
    src = read_sources(cfg)
    assert src.tokenizer is not None and src.self_distill and src.layers == [22, 25]
    assert src.base_config.num_hidden_layers == 30 and src.base_config.name_or_path.endswith(f)
