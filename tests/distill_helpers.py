"""Shared pieces of the distillation tests: a tiny byte-level tokenizer with a chat template, a tiny
Llama base model saved with it, small jsonl datasets, and a run config for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.ports import free_port  # noqa: F401 - re-exported for the distillation tests

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(chat_template: str | None = CHATML):
    """256 byte tokens + 4 specials (260 ids), no merges: every string round-trips, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character map, in byte order (ByteLevel.alphabet() is an unordered set)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def save_base(tmp_path, family: str = "llama", name: str = "base", seed: int = 0, **overrides) -> Path:
    """A tiny HF model of ``family`` with the byte tokenizer, saved under ``tmp_path/name``."""
    from tests.model_factories import tiny_hf_model

    model = tiny_hf_model(family, seed=seed, **overrides)
    out = Path(tmp_path) / name
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def write_text_jsonl(path, n: int = 48, seed: int = 0, min_words: int = 3, max_words: int = 30) -> Path:
    import random

    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randint(min_words, max_words)
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(k))}) + "\n")
    return path


def write_chat_jsonl(path, n: int = 24, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            msgs = [{"role": "user", "content": f"what is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            if rng.random() < 0.5:
                msgs += [{"role": "user", "content": "and times two?"},
                         {"role": "assistant", "content": f"{2 * (a + b)}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def ds_config(tmp_path, name: str = "zero3_test.json", stage: int = 3, **extra) -> Path:
    """A ZeRO config that partitions even tiny parameters (the default persistence threshold would keep
    every parameter of a tiny model whole on every rank, and test nothing)."""
    cfg = json.loads((ROOT / "ds_configs" / ("zero3.json" if stage == 3 else "zero2.json")).read_text())
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg.update(extra)
    p = Path(tmp_path) / name
    p.write_text(json.dumps(cfg))
    return p


def teacher_ds_config(tmp_path) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "zero3_teacher.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    p = Path(tmp_path) / "zero3_teacher_test.json"
    p.write_text(json.dumps(cfg))
    return p


def run_args(tmp_path, base, data, out, steps: int = 6, **settings) -> list[str]:
    """Command-line arguments of a tiny run (also usable in-process through make_config)."""
    args = [
        "--model", str(base), "--layers", "1,2", "--data", str(data), "--out", str(out),
        "--steps", str(steps), "--seq-len", "64", "--micro-batch", "2",
        "--deepspeed", str(ds_config(tmp_path)), "--teacher.deepspeed", str(teacher_ds_config(tmp_path)),
        "--wandb=false", "--log.progress=false", "--optim.lr=3e-3", "--optim.warmup_steps=2",
        "--loss.hidden_weight=0.5", "--train.dist_timeout_s=120",
        # the published mapping: the tiny students start far from their teacher, so a few steps visibly learn
        "--student.init=attention",
    ]
    for k, v in settings.items():
        args.append(f"--{k.replace('__', '.')}={v}")
    return args


def test_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def run(cmd, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=test_env(**env))


def launcher(name: str) -> str:
    return str(ROOT / "launchers" / name)


def python() -> str:
    return sys.executable


def metrics(out) -> list[dict]:
    p = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def assert_same_steps(rows, reference, steps, rel=1e-6):
    """The metrics rows of ``steps`` equal the reference run's (loss terms, grad norm, lr)."""
    import pytest

    by_step = {r["step"]: r for r in rows}
    ref = {r["step"]: r for r in reference}
    assert sorted(by_step) == sorted(steps), sorted(by_step)
    for s in steps:
        for key in ("loss", "kd", "hidden", "grad_norm", "lr"):
            if key in ref[s]:
                assert by_step[s][key] == pytest.approx(ref[s][key], rel=rel, abs=1e-9), (s, key)


def unique_python(tmp_path) -> str:
    """A python executable at a path of this test's own (a symlinked copy of the venv). DeepSpeed's pdsh
    launcher, when interrupted, runs `pkill -f "<python> -u -m deepspeed.launcher.launch"` on every host:
    with a unique <python> path that can only ever match this test's processes."""
    venv = Path(sys.prefix)
    d = Path(tmp_path) / "py"
    (d / "bin").mkdir(parents=True, exist_ok=True)
    (d / "pyvenv.cfg").write_text((venv / "pyvenv.cfg").read_text())
    if not (d / "lib").exists():
        (d / "lib").symlink_to(venv / "lib")
    exe = d / "bin" / "python"
    if not exe.exists():
        exe.symlink_to(Path(sys.executable).resolve())
    return str(exe)


def load_launcher(name: str):
    """A launcher module (launchers/<name>.py) imported in-process, to call its main() or make_config()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launcher_{name}", ROOT / "launchers" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def six_step_args(d, base, data, out, *extra) -> list[str]:
    """The run the 2-rank and multi-node tests compare with 1 process: 6 steps, a checkpoint every 2, global
    batch 4 (2 ranks x micro 2, or 1 process x micro 2 x grad_accum 2). The head stays whole: a vocab-parallel
    head sums in another order, which six Adam steps amplify past these tests' 1e-6 (tests/test_vocab_parallel.py
    checks that path against the whole head)."""
    return run_args(d, base, data, out, steps=6, checkpoint__every=2, checkpoint__keep=3,
                    train__global_batch=4, student__vocab_parallel="false") + list(map(str, extra))


def one_process_run(args):
    """Run in this process with one torch thread; returns (metrics rows, final exported state dict)."""
    import torch

    from rad_ds.distill import distill
    from rad_ds.models import RadHybridForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = distill(load_launcher("distill").make_config(args))
    finally:
        torch.set_num_threads(threads)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return result.losses, RadHybridForCausalLM.from_pretrained(str(result.export)).state_dict()
