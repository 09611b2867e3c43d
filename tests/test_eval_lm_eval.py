"""An exported student in EleutherAI's lm-evaluation-harness: the ``lm_eval`` command line with
``--model hf --model_args pretrained=DIR,trust_remote_code=True`` on the local tasks shipped in
rad_ds/eval/lm_eval_tasks, and the harness sees the same model rad-ds does (same greedy continuations,
same log-likelihoods)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.eval_helpers import save_models

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "rad_ds" / "eval" / "lm_eval_tasks"
LM_EVAL = shutil.which("lm_eval", path=str(Path(sys.executable).parent)) or shutil.which("lm_eval")

pytestmark = pytest.mark.skipif(LM_EVAL is None, reason="lm-eval is not installed (pip install lm-eval)")



def _samples(out: Path, task: str) -> list[dict]:
    (f,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    return [json.loads(x) for x in Path(f).read_text().splitlines()]


def test_student_in_lm_eval_harness(tmp_path):
    _, student = save_models(tmp_path, mamba_layers=(1, 2))
    data = tmp_path / "mc.jsonl"  # in the tiny vocabulary, so the choices differ
    data.write_text("".join(json.dumps({"question": f"w{i} w{i + 3} 7", "choices": [str(i), str(i + 1), "w5"],
                                        "answer": i % 3}) + "\n" for i in range(3)))
    out = tmp_path / "lm_eval_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [LM_EVAL, "--model", "hf", "--model_args", f"pretrained={student},trust_remote_code=True",
         "--tasks", "rad_gsm_local,rad_mc_local", "--include_path", str(TASKS), "--device", "cpu",
         "--batch_size", "2", "--limit", "3", "--gen_kwargs", "max_gen_toks=6", "--output_path", str(out),
         "--log_samples", "--metadata", json.dumps({"mc_file": str(data)})],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "rad_gsm_local" in r.stdout and "exact_match" in r.stdout and "rad_mc_local" in r.stdout
    (res,) = glob.glob(str(out / "*" / "results_*.json"))
    results = json.loads(Path(res).read_text())["results"]
    assert _samples(out, "rad_mc_local")[0]["doc"]["question"] == "w0 w3 7"  # --metadata mc_file was read
    assert "Bobby" in _samples(out, "rad_gsm_local")[0]["doc"]["question"]  # the shipped GSM sample

    # the harness ran our model: its greedy continuations and log-likelihoods are ours, and its scores are
    # the ones our continuations and log-likelihoods give
    from rad_ds.eval.answers import is_correct
    from rad_ds.models.conversion import load_model

    model, tok = load_model(student)
    assert model.config.layer_types[1:3] == ["mamba2", "mamba2"]
    gsm_right, mc_right = [], []
    with torch.no_grad():
        for s in _samples(out, "rad_gsm_local"):
            ctx, kw = s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"]
            ids = tok(ctx, return_tensors="pt").input_ids
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0, ids.size(1):], skip_special_tokens=True)
            for stop in kw["until"]:
                text = text.split(stop)[0]
            assert s["resps"][0][0] == text
            gsm_right.append(is_correct(text, s["doc"]["answer"]))
        for s in _samples(out, "rad_mc_local"):
            lls = []
            for j, args in enumerate(s["arguments"].values()):
                ctx = tok(args["arg_0"]).input_ids
                cont = tok(args["arg_1"]).input_ids
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids).logits[0, len(ctx) - 1:-1].float(), -1)
                ll = float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
                assert abs(float(s["resps"][j][0][0]) - ll) < 1e-4
                lls.append(ll)
            assert len(lls) == 3 and len(set(lls)) == 3  # no ties: the argmax is the model's choice
            mc_right.append(lls.index(max(lls)) == s["doc"]["answer"])
    assert len(gsm_right) == len(mc_right) == 3
    assert results["rad_gsm_local"]["exact_match,none"] == pytest.approx(sum(gsm_right) / 3, abs=1e-9)
    assert results["rad_mc_local"]["acc,none"] == pytest.approx(sum(mc_right) / 3, abs=1e-9)
