"""Distillation on 2 ranks (CPU, gloo) through the real launchers, against a 1-process run of the same
global batch: the `deepspeed` launcher with a rank SIGKILLed in the middle of a checkpoint save (the job
must exit with an error, not hang, and leave `latest` on a complete checkpoint), a `torchrun` resume
that must finish exactly like the uninterrupted 1-process run, and a resume of that 2-rank checkpoint
on 1 process (a changed world size)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rad_ds.distill.checkpoint import is_complete, latest_checkpoint
from tests.distill_helpers import (
    assert_same_steps,
    free_port,
    launcher,
    metrics,
    one_process_run,
    python,
    run,
    save_base,
    six_step_args,
    write_text_jsonl,
)
from tests.test_distill import L, _distill, _final_state

pytestmark = pytest.mark.slow
STEPS = list(range(1, 7))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 1-process run (in this process)."""
    d = tmp_path_factory.mktemp("dist")
    base, data = save_base(d), write_text_jsonl(d / "text.jsonl", n=48)
    rows, final = one_process_run(six_step_args(d, base, data, d / "one_process"))
    return d, base, data, rows, final


def test_two_ranks_killed_mid_save_resume_equals_one_process(reference, tmp_path):
    d, base, data, ref_rows, ref_final = reference
    out = tmp_path / "two"
    args = six_step_args(d, base, data, out)
    # 1. `deepspeed`, 2 ranks: rank 1 is SIGKILLed after writing its shards of step 4, before `latest` moves
    r = run([python(), "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port(),
             launcher("distill.py"), *args], timeout=300, RAD_DS_FAULT="kill@save_after_shards:step=4:rank=1")
    assert r.returncode != 0, r.stdout[-2000:]
    root = out / "checkpoints"
    assert latest_checkpoint(root).name == "step_00000002"
    assert (root / "step_00000004").is_dir() and not is_complete(root / "step_00000004")
    assert_same_steps(metrics(out), ref_rows, [1, 2, 3, 4])  # 2 ranks == 1 process, step by step

    # 2. `torchrun`, 2 ranks, --resume auto: continues from step 2 and ends where the 1-process run ended
    r = run([python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             launcher("distill.py"), *args, "--resume", "auto"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps 2..6 of 6" in r.stdout
    assert_same_steps(metrics(out), ref_rows, STEPS)
    final = _final_state(out / "final")
    for k, v in ref_final.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-7, msg=k)
    assert is_complete(root / "step_00000004")  # the interrupted save was redone, complete this time

    # 3. the 2-rank checkpoint of step 4 resumed on 1 process (in this process): steps 5-6 as before
    torch.set_num_threads(1)
    one = _distill(L.make_config(six_step_args(d, base, data, tmp_path / "one", "--resume", root / "step_00000004")))
    assert_same_steps(one.losses, ref_rows, [5, 6])
    assert not (tmp_path / "one" / "checkpoints" / "universal").exists()  # the converted copy is removed
    final = _final_state(one.export)
    for k, v in ref_final.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-7, msg=k)
    assert Path(one.export, "distill.json").is_file()
