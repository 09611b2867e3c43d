"""A real multi-node launch on one machine: `deepspeed --hostfile` with two loopback "nodes"
(127.0.0.1 and 127.0.0.2, one rank each) over ssh + pdsh, set up by scripts/multinode_setup.sh (its own
sshd and key; installs openssh-server and pdsh when missing).

Run 1 resumes a 1-process checkpoint on the two nodes (a changed world size) and runs a few steps;
run 2 resumes that with --resume auto. Both must reproduce the uninterrupted 1-process run exactly.
Only variables listed in the DS_ENV_FILE (and PYTHON*) reach the remote ranks; the launch runs from a
python path of this test's own, so the pdsh launcher's `pkill -f` on interruption cannot hit other runs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from rad_ds.distill.checkpoint import latest_checkpoint
from tests.distill_helpers import (
    ROOT,
    assert_same_steps,
    free_port,
    launcher,
    metrics,
    one_process_run,
    run,
    save_base,
    six_step_args,
    unique_python,
    write_text_jsonl,
)
from tests.test_distill import _final_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """sshd on loopback (started here unless already running) -> (hostfile, port, ssh args)."""
    if os.environ.get("RAD_DS_SKIP_MULTINODE") == "1":
        pytest.skip("RAD_DS_SKIP_MULTINODE=1")
    state = Path(os.environ.get("RAD_DS_MULTINODE_DIR", ROOT / ".cache" / "multinode"))
    pidfile = state / "sshd.pid"

    def alive():
        try:
            os.kill(int(pidfile.read_text()), 0)
            return True
        except (OSError, ValueError):
            return False

    was_running = alive()
    r = subprocess.run(["bash", str(ROOT / "scripts" / "multinode_setup.sh")], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "RAD_DS_MULTINODE_DIR": str(state)})
    assert r.returncode == 0, f"multinode setup failed:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
    env = dict(line.removeprefix("export ").split("=", 1) for line in (state / "env.sh").read_text().splitlines())
    yield state / "hostfile", env["RAD_DS_SSH_PORT"], env["PDSH_SSH_ARGS_APPEND"].strip('"')
    if not was_running:
        subprocess.run(["bash", str(ROOT / "scripts" / "multinode_setup.sh"), "--stop"],
                       env={**os.environ, "RAD_DS_MULTINODE_DIR": str(state)}, timeout=60)


def test_two_loopback_nodes_resume_equals_one_process(nodes, tmp_path):
    hostfile, port, ssh_args = nodes
    base, data = save_base(tmp_path), write_text_jsonl(tmp_path / "text.jsonl", n=48)
    # the uninterrupted 1-process run, in this process
    ref_rows, ref_final = one_process_run(six_step_args(tmp_path, base, data, tmp_path / "one_process"))

    env_file = tmp_path / "ds_env"  # what the remote ranks get (besides PYTHON*)
    env_file.write_text("OMP_NUM_THREADS=1\nTOKENIZERS_PARALLELISM=false\nWANDB_MODE=offline\n"
                        "HF_HUB_OFFLINE=1\nHF_DATASETS_OFFLINE=1\nPYTHONWARNINGS=ignore\n")
    py = unique_python(tmp_path)
    out = tmp_path / "nodes"

    def launch(*extra):
        return run([py, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--master_addr", "127.0.0.1",
                    "--master_port", free_port(), "--ssh_port", port, "--no_ssh_check",
                    launcher("distill.py"), *six_step_args(tmp_path, base, data, out, *extra)],
                   timeout=300, DS_ENV_FILE=str(env_file), PDSH_SSH_ARGS_APPEND=ssh_args)

    # run 1: the 1-process checkpoint of step 2 on two nodes (world 1 -> 2), two steps, then stop
    r = launch("--resume", tmp_path / "one_process" / "checkpoints" / "step_00000002", "--train.stop_after=2")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "127.0.0.1: " in r.stdout and "127.0.0.2: " in r.stdout  # pdsh prefixes each node's output
    assert latest_checkpoint(out / "checkpoints").name == "step_00000004"
    assert_same_steps(metrics(out), ref_rows, [3, 4])
    # run 2: --resume auto on the two nodes, to the end
    r = launch("--resume", "auto")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert_same_steps(metrics(out), ref_rows, [3, 4, 5, 6])
    final = _final_state(out / "final")
    for k, v in ref_final.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-7, msg=k)
