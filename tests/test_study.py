"""The placement study on a tiny model: every method gives a student per training seed, the same budget for each,
test scores against a direct computation, the results schema (per-seed scores, intervals, paired differences), runs
shared by placements that agree, and a re-run that resumes instead of redoing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.distill_helpers import ds_config, load_launcher, save_base, teacher_ds_config, write_chat_jsonl

P = load_launcher("placement")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    base = save_base(d, num_hidden_layers=5)
    report = {"model": "tiny", "num_hidden_layers": 5,
              "layers": [{"index": i, "type": "attention", "single_skip": {"acceptance_rate": 0.5 + 0.1 * i}}
                         for i in range(5)],
              "selections": [{"k": 2, "layers": [0, 2], "method": "bo"}]}  # = even's layers: the runs are shared
    (d / "report.json").write_text(json.dumps(report))
    return d, base, write_chat_jsonl(d / "train.jsonl", n=40, seed=0), write_chat_jsonl(d / "held.jsonl", n=12, seed=9)


def _args(d, base, train, held, out, *extra):
    return ["--model", str(base), "--k", "2", "--data", str(train), "--test", str(held), "--out", str(out),
            "--steps", "4", "--seq-len", "64", "--micro-batch", "2", "--eval_every=2", "--cache_k=16",
            "--seeds", "0,1", "--methods=rad,even,random", "--random_seeds=3", f"--report={d / 'report.json'}",
            "--heldout_rows=4", "--heldout_prompts=3", "--greedy_tokens=6", "--calibration_docs=4",
            f"--distill.deepspeed={ds_config(d)}", f"--distill.teacher.deepspeed={teacher_ds_config(d)}",
            "--distill.wandb=false", "--distill.log.progress=false", "--distill.optim.lr=3e-3",
            "--distill.loss.hidden_weight=0", "--distill.student.init=attention", *extra]


def test_study_end_to_end_and_resume(setup, tmp_path, capsys):
    d, base, train, held = setup
    out = tmp_path / "study"
    assert P.main(_args(d, base, train, held, out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["split"] == "test" and res["seeds"] == [0, 1] and list(res["k"]) == ["2"]
    m = res["k"]["2"]
    assert set(m) == {"rad", "even", "random", "random_median"} and len(m["random"]) == 1
    assert m["rad"]["layers"] == m["even"]["layers"] == [0, 2]
    budgets = set()
    for row in [m["rad"], m["even"], *m["random"]]:
        assert len(set(row["layers"])) == 2 and all(0 <= i < 5 for i in row["layers"])
        assert row["curve"]["steps"] == [0, 2, 4] and len(row["test_kl"]) == 2
        for key in ("test_kl", "ppl", "top1_agreement", "greedy_agreement", "selection_seconds"):
            assert key in row and key in row["mean"] or key == "selection_seconds"
        a, b = row["test_kl"]
        assert row["mean"]["test_kl"] == pytest.approx((a + b) / 2)
        half = 12.7062047 * abs(a - b) / 2  # Student t(0.975, 1 df) x the standard error of two values
        assert row["ci95"]["test_kl"] == pytest.approx([(a + b) / 2 - half, (a + b) / 2 + half], rel=1e-6)
        for per_seed in zip(*row["curve"]["test_kl"]):
            assert per_seed[-1] < per_seed[0]  # every student learns
        assert row["test_kl"][0] != row["test_kl"][1]  # the training seed changes the data order
        budgets.add(row["curve"]["tokens"][-1])
        for run in row["runs"]:
            assert (out / "arms" / run / "final" / "config.json").is_file()
    assert len(budgets) == 1  # the same tokens for every student
    # rad and even agree on their layers: one run per seed serves both, and their paired difference is 0
    assert m["rad"]["runs"] == m["even"]["runs"] and res["distinct_runs"] == 4
    assert res["paired"]["2"]["even"]["test_kl_diff"] == [0.0, 0.0]
    rnd = m["random"][0]["test_kl"]
    assert res["paired"]["2"]["random_median"]["test_kl_diff"] == pytest.approx(
        [m["rad"]["test_kl"][i] - rnd[i] for i in range(2)])
    md = (out / "results.md").read_text()
    assert md.startswith("# Placement study") and "Split: test" in md and (out / "curves.png").stat().st_size
    assert res["budget"]["teacher_cache_k"] == 16 and res["budget"]["seeds"] == [0, 1]

    stamp = {p: p.stat().st_mtime_ns for p in (out / "arms").glob("*/*/final/model.safetensors")}
    assert len(stamp) == 4
    assert P.main(_args(d, base, train, held, out)) == 0  # everything is done: nothing re-runs
    assert {p: p.stat().st_mtime_ns for p in (out / "arms").glob("*/*/final/model.safetensors")} == stamp
    again = json.loads((out / "results.json").read_text())
    assert again["k"]["2"]["even"]["test_kl"] == m["even"]["test_kl"]
    # the wall time accumulates over invocations: the first run's whole time plus the (short) second one
    assert res["invocations"] == 1 and again["invocations"] == 2
    assert again["study_seconds"] == pytest.approx(res["study_seconds"] + again["study_seconds_this_invocation"],
                                                   abs=0.5)
    assert "over 2 invocations" in (out / "results.md").read_text()


def test_heldout_metrics_against_a_direct_computation(setup):
    """The teacher scores KL 0 and agreement 1 against itself; a student's KL, perplexity and top-1 agreement
    equal a direct computation over the packed held-out rows."""
    from rad_ds.data import build_packed
    from rad_ds.decoding.prompts import encode
    from rad_ds.data.config import DataConfig
    from rad_ds.distill.losses import token_divergence
    from rad_ds.models.conversion import load_model
    from rad_ds.study.heldout import HeldOut
    from rad_ds.surgery import replace_attention

    d, base, _, held = setup
    teacher, tok = load_model(base)
    packed = build_packed(DataConfig(path=str(held), seq_len=64), tok)
    prompts = [encode(tok, "text", "what is 2 plus 3?", chat=True)]
    ref = HeldOut(teacher, tok, packed, prompts, greedy_tokens=5, micro_batch=3)
    same = ref.evaluate(teacher)
    assert same["heldout_kl"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["greedy_agreement"] == 1.0 and same["greedy_prefix"] == ref.prompts[0].continuation.numel() > 0

    student, _ = load_model(base)
    replace_attention(student, [1, 3], init="attention", seed=0)
    got = ref.evaluate(student)
    ids = torch.from_numpy(packed.input_ids.astype("int64"))
    pos = torch.from_numpy(packed.position_ids.astype("int64"))
    tgt = torch.from_numpy(packed.target.astype(bool))
    with torch.no_grad():
        t, s = teacher(ids, position_ids=pos).logits, student(ids, position_ids=pos).logits
    kl = token_divergence(s[tgt], t[tgt]).mean()
    nxt = torch.roll(ids, -1, 1)[tgt]
    ce = torch.nn.functional.cross_entropy(s[tgt].double(), nxt)
    assert got["heldout_kl"] == pytest.approx(float(kl), rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(float((s[tgt].argmax(-1) == t[tgt].argmax(-1)).double().mean()))
    assert got["heldout_kl"] > 0.01


def test_study_config_errors(setup, tmp_path):
    d, base, train, held = setup
    cfg = P.cli.parse_config(P.cli.StudyConfig, _args(d, base, train, train, tmp_path / "s"), None, P.cli.FLAGS)
    with pytest.raises(ValueError, match="test is the training data"):
        cfg.validate()
    with pytest.warns(DeprecationWarning, match="heldout is deprecated"):  # the old name still sets test
        old = P.cli.parse_config(P.cli.StudyConfig, [a.replace("--test", "--heldout") for a in
                                                     _args(d, base, train, held, tmp_path / "s")], None, P.cli.FLAGS)
    assert old.test == str(held)
    cfg = P.cli.parse_config(P.cli.StudyConfig, _args(d, base, train, held, tmp_path / "s", "--methods=rad,best"),
                             None, P.cli.FLAGS)
    with pytest.raises(ValueError, match="'best' is not a placement method"):
        cfg.validate()


def test_shipped_study_config_validates(setup, tmp_path):
    """configs/placement_smollm2.yaml loads; with its corpus paths pointed at files here it validates whole
    (every student's run config included)."""
    from rad_ds.study.config import StudyConfig

    d, base, train, held = setup
    cfg = StudyConfig.load(ROOT / "configs" / "placement_smollm2.yaml")
    assert cfg.k == [4, 8] and len(cfg.seeds) >= 3 and "rad" in cfg.methods and cfg.distill.train.steps > 0
    cfg.out, cfg.test, cfg.distill.data.path = str(tmp_path / "s"), str(held), str(train)
    cfg.validate()


def test_diagnosis_prompts_come_from_the_training_data(tmp_path):
    """Prompts taken from training data (``diagnose_on=train_prompts``, the re-check): chats up to their first answer
    (never the answer), text documents cut, shuffled by seed."""
    from rad_ds.decoding.prompts import rows_from_data

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"},
                                                      {"role": "user", "content": "more"}]}) + "\n"
                             for i in range(6)))
    rows = rows_from_data(chats, seed=0)
    assert sorted(v[0]["content"] for _, v in rows) == [f"q{i}" for i in range(6)]
    assert all(kind == "chat" and v == [{"role": "user", "content": v[0]["content"]}] for kind, v in rows)
    assert [v[0]["content"] for _, v in rows] != [f"q{i}" for i in range(6)]  # shuffled
    assert rows_from_data(chats, seed=0) == rows

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "x" * 3000}) + "\n" + json.dumps({"text": " "}) + "\n")
    assert rows_from_data(text, 0) == [("text", "x" * 1000)]


def test_mean_interval_against_the_t_table():
    """95% Student-t interval of a mean: t(0.975, 2 df) = 4.3027 from the printed table, not from scipy."""
    from rad_ds.core.intervals import mean_interval

    m, (lo, hi) = mean_interval([0.10, 0.12, 0.17])
    sd = ((0.03 ** 2 + 0.01 ** 2 + 0.04 ** 2) / 2) ** 0.5  # deviations from the mean 0.13
    assert m == pytest.approx(0.13) and hi - m == pytest.approx(4.3027 * sd / 3 ** 0.5, rel=1e-4)
    assert m - lo == pytest.approx(hi - m)
    assert mean_interval([0.5]) == (0.5, None)


def test_results_record_their_provenance():
    import subprocess

    from rad_ds.core.provenance import provenance

    p = provenance(["python", "benchmarks/x.py", "--k", "4"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert p["commit"] == head and isinstance(p["dirty"], bool) and p["command"] == "python benchmarks/x.py --k 4"
    assert p["versions"]["torch"] and p["machine"]["cpus"] >= 1 and p["date"][:2] == "20"


def test_committed_results_follow_their_contract():
    """The committed study and stability results keep the keys users' scripts read (issue contract)."""
    res = json.loads((ROOT / "benchmarks" / "results" / "placement_cpu.json").read_text())
    assert res["split"] == "test" and len(res["seeds"]) >= 3 and {"4", "8"} <= set(res["k"])
    for k in ("4", "8"):
        m = res["k"][k]
        for method in ("rad", "cosine", "single_skip", "even"):
            assert len(m[method]["layers"]) == int(k) and len(m[method]["test_kl"]) == len(res["seeds"])
        assert m["random"] and all(len(r["test_kl"]) == len(res["seeds"]) for r in m["random"])
        assert res["provenance"]["commit"] and res["provenance"]["command"].startswith("python launchers/placement.py")
    stab = json.loads((ROOT / "benchmarks" / "results" / "diagnosis_stability_cpu.json").read_text())
    assert set(stab["default"]["jaccard"]) == {"2", "4", "8"} and stab["default"]["seconds"] > 0
