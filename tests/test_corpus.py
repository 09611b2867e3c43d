"""The distillation corpus builder, against oracles: the train / validation / test rule recomputed from its
definition with hashlib (disjoint by document group, stable, near the asked fractions), the teacher's answers
against transformers' own greedy ``generate`` of the original Llama, one prompt at a time without padding, the
records read back through rad_ds/data, an uninterrupted build (a build killed after one generation batch resumes
to the same bytes), one-line errors on bad input, and the former two-way split's keys and corpus directories."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from rad_ds.core.config import REPO_ROOT
from rad_ds.core.shared_cache import MARKER
from rad_ds.data.corpus import Journal, build_corpus, split_of
from rad_ds.data.corpus_config import CorpusConfig
from tests.distill_helpers import load_launcher, save_base, write_chat_jsonl

L = load_launcher("corpus")
SPLITS = ("train", "validation", "test")
DATA = tuple(f"{s}/{k}.jsonl" for s in SPLITS for k in ("chat", "code"))
PROMPTS = ("validation_prompts.jsonl", "test_prompts.jsonl")
FILES = DATA + PROMPTS
VAL, TEST = 0.25, 0.25  # the small corpus' fractions


def _cfg(base: Path, chat: Path, out: Path, **settings) -> CorpusConfig:
    """A small corpus: 8 gsm_symbolic problems and a chat file answered in 6 new tokens, 6 stdlib files."""
    s = {"teacher.path": str(base), "out": str(out), "math.per_task": 8, "math.exclude_size": 0,
         "chat.path": str(chat), "code.stdlib_files": 6, "code.max_chars": 600, "split.validation_fraction": VAL,
         "split.test_fraction": TEST, "split.min_validation": 1, "split.min_test": 1, "generation.max_new_tokens": 6,
         "generation.batch_size": 3, "progress": False, **settings}
    cfg = CorpusConfig()
    for k, v in s.items():
        cfg.set(k, v)
    return cfg


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _unit(salt: str, group: str) -> float:
    """The documented hash, from hashlib: the first 8 bytes of sha256(salt NUL "split/" group) / 2^64."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0split/{group}".encode()).digest()[:8], "big") / 2 ** 64


def _oracle(group: str, val: float, test: float, salt: str) -> str:
    u = _unit(salt, group)
    return "test" if u < test else "validation" if u < test + val else "train"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    # byte tokens: a GSM8K problem is ~400 of them; a wide init makes the answers differ by prompt (the default
    # one answers every prompt with the same newlines, which would test nothing)
    base = save_base(d, max_position_embeddings=2048, initializer_range=0.3)
    chat = write_chat_jsonl(d / "chat.jsonl", n=10, seed=3)
    chat.write_text(chat.read_text() + chat.read_text().splitlines()[0] + "\n")  # a duplicate prompt
    cfg = _cfg(base, chat, d / "out")
    return base, chat, cfg, build_corpus(cfg)


def test_split_rule_is_a_salted_sha256_near_the_fractions():
    groups = [f"g/{i}" for i in range(6000)]
    got = [split_of(g, 0.15, 0.2, "salt") for g in groups]
    assert got == [_oracle(g, 0.15, 0.2, "salt") for g in groups]  # the documented rule, on every machine and run
    share = {s: got.count(s) / len(got) for s in SPLITS}
    assert share == pytest.approx({"train": 0.65, "validation": 0.15, "test": 0.2}, abs=0.02)  # ~4.5 sigma
    assert got != [split_of(g, 0.15, 0.2, "other salt") for g in groups]
    # test is the lowest band: the former two-way split's held-out side (u < heldout_fraction) stays test, and
    # changing validation_fraction moves groups only between validation and train
    assert [s == "test" for s in got] == [_unit("salt", g) < 0.2 for g in groups]
    wider = [split_of(g, 0.3, 0.2, "salt") for g in groups]
    assert [s == "test" for s in wider] == [s == "test" for s in got]


def test_three_splits_by_document_group_disjoint_and_complete(built):
    _, _, cfg, summary = built
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [*SPLITS, *PROMPTS, "corpus.json", "README.md"])  # nothing named heldout
    rows = {s: _rows(out / s / "chat.jsonl") + _rows(out / s / "code.jsonl") for s in SPLITS}
    groups = {s: {r["group"] for r in rows[s]} for s in SPLITS}
    assert all(groups[a].isdisjoint(groups[b]) for a, b in (("train", "validation"), ("train", "test"),
                                                               ("validation", "test")))
    for s in SPLITS:
        assert rows[s] and all(_oracle(r["group"], VAL, TEST, cfg.split.salt) == s for r in rows[s])
    every = [r for s in SPLITS for r in rows[s]]
    ids = [r["id"] for r in every]
    assert len(ids) == len(set(ids))
    # every document is in a split: 8 problems (templates as groups), 10 unique chats, 164 human-eval, 6 stdlib
    by_source = {s: sum(r["source"] == s for r in every) for s in ("gsm_symbolic", "chat", "human_eval", "stdlib")}
    assert by_source == {"gsm_symbolic": 8, "chat": 10, "human_eval": 164, "stdlib": 6}
    assert all(r["group"].startswith("gsm_symbolic/template-") for r in every if r["source"] == "gsm_symbolic")
    for s in ("validation", "test"):
        assert 0.12 < len(rows[s]) / len(ids) < 0.4
    # corpus.json and the summary count what the files hold
    desc = json.loads((out / "corpus.json").read_text())
    t = desc["totals"]
    assert [t[s]["documents"] for s in SPLITS] == [len(rows[s]) for s in SPLITS] == [
        summary.train_documents, summary.validation_documents, summary.test_documents]
    assert all(sum(v[s]["documents"] for v in desc["sources"].values()) == len(rows[s]) for s in SPLITS)
    assert desc["split"]["validation_fraction"] == VAL and desc["split"]["test_fraction"] == TEST
    assert desc["dropped"]["chat_duplicate_prompts"] == 1
    assert desc["files"] == {f: len(_rows(out / f)) for f in FILES}
    for s in ("validation", "test"):
        prompts = _rows(out / f"{s}_prompts.jsonl")
        assert [p["id"] for p in prompts] == [r["id"] for r in _rows(out / s / "chat.jsonl")]
        assert all(p["messages"][-1]["role"] == "user" and p["reference"] for p in prompts)
        assert t[s]["prompts"] == len(prompts) == getattr(summary, f"{s}_prompts") > 0
    line = summary.line()
    for s in SPLITS:
        assert f"{s} {len(rows[s])} documents ({t[s]['tokens']} tokens)" in line, line
    readme = (out / "README.md").read_text()
    assert "licence" in readme and "| validation docs | validation tokens | test docs | test tokens |" in readme


def test_teacher_answers_equal_transformers_greedy_generate(built):
    """Oracle: transformers' Llama (not rad-ds' import of it), one prompt at a time, no padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _, cfg, _ = built
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    eos = sorted({tok.eos_token_id, model.config.eos_token_id})
    out = Path(cfg.out)
    chats = [r for s in SPLITS for r in _rows(out / s / "chat.jsonl")]
    assert len(chats) == 18 and len({r["messages"][-1]["content"] for r in chats}) > 12
    for r in chats:
        ids = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        gen = gen[:next((j for j, t in enumerate(gen) if t in eos), len(gen))]
        assert r["messages"][-1] == {"role": "assistant", "content": tok.decode(gen, skip_special_tokens=True)}, r["id"]


def test_records_load_through_rad_ds_data(built, tmp_path, monkeypatch):
    from rad_ds.data import build_packed
    from rad_ds.decoding.prompts import load_prompts
    from rad_ds.data.config import DataConfig
    from tests.distill_helpers import byte_tokenizer

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    _, _, cfg, summary = built
    tok = byte_tokenizer()
    for f in DATA:
        packed = build_packed(DataConfig(path=str(Path(cfg.out) / f), seq_len=1024, num_proc=1), tok)
        assert len(packed) > 0 and packed.target.sum() > 0
    for f, n in zip(PROMPTS, (summary.validation_prompts, summary.test_prompts)):
        prompts = load_prompts(tok, str(Path(cfg.out) / f), n=0)
        assert len(prompts) == n > 0
        assert tok.decode(prompts[0].tolist()).endswith("<|im_start|>assistant\n")


def test_a_complete_corpus_is_reused_and_stale_temp_dirs_are_cleaned(built, tmp_path):
    base, chat, cfg, _ = built
    before = {f: (Path(cfg.out) / f).read_bytes() for f in FILES}
    again = build_corpus(_cfg(base, chat, Path(cfg.out)))
    assert again.reused and {f: (Path(cfg.out) / f).read_bytes() for f in FILES} == before
    # other settings: refused unless --overwrite
    with pytest.raises(ValueError, match="holds a corpus built with other settings; choose another --out"):
        build_corpus(_cfg(base, chat, Path(cfg.out), **{"math.seed": 5}))
    # a temp dir left by a killed build is removed by the next build
    out = tmp_path / "fresh"
    stale = tmp_path / ".fresh.tmp-killed"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "chat.jsonl").write_text("partial")
    s = build_corpus(_cfg(base, chat, out, **{"code.human_eval": False}))
    assert not s.reused and not stale.exists() and (out / "corpus.json").is_file()


def test_a_two_way_corpus_is_refused_then_rebuilt_with_overwrite(built, tmp_path):
    """A complete corpus of the former layout (format 1: train/, heldout/) is never reused as the new one."""
    base, chat, _, _ = built
    old = tmp_path / "old"
    (old / "heldout").mkdir(parents=True)
    (old / "heldout" / "chat.jsonl").write_text("{}\n")
    (old / "corpus.json").write_text(json.dumps({"format": 1, "totals": {"heldout": {}}}))
    (old / MARKER).write_text(json.dumps({"key": {"corpus": "0123456789abcdef", "format": 1}}))
    settings = {"code.human_eval": False, "code.stdlib_files": 2, "math.per_task": 0}
    with pytest.raises(ValueError, match=r"holds a corpus of format 1 \(train/ and heldout/\), not format 2 "
                                         r"\(train/, validation/, test/\); pass --overwrite"):
        build_corpus(_cfg(base, chat, old, **settings))
    s = build_corpus(_cfg(base, chat, old, overwrite=True, **settings))
    assert not s.reused and not (old / "heldout").exists() and (old / "test" / "chat.jsonl").is_file()


def test_a_killed_build_resumes_to_the_same_bytes(built, tmp_path, monkeypatch):
    base, chat, _, _ = built
    settings = {"code.human_eval": False, "code.stdlib_files": 2}
    whole = build_corpus(_cfg(base, chat, tmp_path / "whole", **settings))
    add, calls = Journal.add, []

    def add_then_die(self, *a):
        add(self, *a)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after its second generation batch

    monkeypatch.setattr(Journal, "add", add_then_die)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_corpus(_cfg(base, chat, out, **settings))
    assert not out.exists() and (tmp_path / ".resumed.generated.jsonl").is_file()
    monkeypatch.setattr(Journal, "add", add)
    get, hits = Journal.get, []
    monkeypatch.setattr(Journal, "get", lambda self, *a: hits.append(get(self, *a)) or hits[-1])
    resumed = build_corpus(_cfg(base, chat, out, **settings))
    assert sum(h is not None for h in hits) == 2 and not (tmp_path / ".resumed.generated.jsonl").exists()
    assert resumed.train_documents == whole.train_documents
    written = [f for f in FILES if (tmp_path / "whole" / f).is_file()]  # a split without code has no code file
    assert len(written) >= len(SPLITS) + len(PROMPTS) and written == [f for f in FILES if (out / f).is_file()]
    for f in written:
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f


@pytest.mark.parametrize("args, message", [
    (["--math.tasks", "nope"], "error: math.tasks: unknown reasoning-gym dataset 'nope'"),
    (["--chat.path", "missing.jsonl"], "error: chat.path missing.jsonl: file not found"),
    (["--split.validation_fraction", "1.5"], "error: split.validation_fraction = 1.5 must be between 0 and 1"),
    (["--split.test_fraction", "0"], "error: split.test_fraction = 0.0 must be between 0 and 1"),
    (["--split.validation_fraction", "0.5", "--split.test_fraction", "0.5"],
     "error: split.validation_fraction + split.test_fraction = 1 must be below 1"),
    (["--generation.batch_size", "0"], "error: generation.batch_size = 0 must be >= 1"),
    (["--chat.answers", "mine"], "error: chat.answers = 'mine': use one of teacher, given"),
    (["--math.per_task", "4", "--split.min_test", "999"], "error: split: "),
    (["--math.per_task", "4", "--split.min_validation", "999"], "error: split: "),
    (["--chat.path", "{bad}", "--math.per_task", "0"], "error: chat.path {bad} record 1: missing field(s) messages"),
])
def test_bad_input_is_one_line(built, tmp_path, capsys, args, message):
    base, _, _, _ = built
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no messages here"}\n')
    args = [str(bad) if a == "{bad}" else a for a in args]
    rc = L.main(["--teacher", str(base), "--out", str(tmp_path / "o"), "--code.human_eval=false",
                 "--code.stdlib_files=0", "--progress=false", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(message.replace("{bad}", str(bad))) and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_out_with_other_files_is_refused(built, tmp_path, capsys):
    base, chat, _, _ = built
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    rc = L.main(["--teacher", str(base), "--out", str(tmp_path / "o"), "--chat.path", str(chat)])
    assert rc == 2 and "holds other files; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep me"


def test_shipped_config_loads_and_validates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # shipped paths (rad_ds/data/demo_chat.jsonl) resolve from anywhere
    cfg = CorpusConfig.load("configs/corpus_smollm2.yaml")
    cfg.out = str(tmp_path / "corpus")
    cfg.validate()
    assert Path(cfg.chat.path) == REPO_ROOT / "rad_ds" / "data" / "demo_chat.jsonl"
    assert cfg.generation.max_new_tokens <= 128
    assert (cfg.split.validation_fraction, cfg.split.test_fraction) == (0.15, 0.15)
    assert CorpusConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_the_former_split_keys_set_the_test_ones_with_a_warning(caplog):
    """split.heldout_fraction / split.min_heldout (the two-way split) still load for one release, as test_*."""
    with pytest.warns(DeprecationWarning) as got:
        cfg = CorpusConfig.from_dict({"split": {"heldout_fraction": 0.2, "min_heldout": 3}}, source="f.yaml")
    assert [str(w.message).split(";")[0] for w in got] == [
        "f.yaml: split.heldout_fraction is deprecated and will be removed in the next release",
        "f.yaml: split.min_heldout is deprecated and will be removed in the next release"]
    assert "sets split.test_fraction" in str(got[0].message) and "sets split.min_test" in str(got[1].message)
    assert (cfg.split.test_fraction, cfg.split.min_test, cfg.split.validation_fraction) == (0.2, 3, 0.15)
    assert "split.min_heldout is deprecated" in caplog.text  # logged too: a command-line user sees it
    with pytest.warns(DeprecationWarning, match="command line: split.heldout_fraction"):
        cfg = CorpusConfig().apply_overrides(["--split.heldout_fraction=0.1"])
    assert cfg.split.test_fraction == 0.1 and "heldout_fraction" not in json.dumps(cfg.to_dict())
