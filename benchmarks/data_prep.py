"""Data preparation throughput: rad-ds' former path (one Python loop, per-prefix chat renders, list best-fit)
against the current one (``datasets.map`` batched over ``num_proc`` processes, one render per conversation,
O(n log n) best-fit), on synthetic multi-turn chat conversations and a real tokenizer.

The conversations are built deterministically here (seeded draws of common English words with Zipf-like
frequencies, 1-4 turns, a system prompt in 30% of them). The tokenizer is SmolLM2-135M-Instruct's (its ChatML template
inserts a default system prompt), from the embedded model (``--tokenizer tiny`` uses the byte tokenizer of
the tests). The former path is rad-ds at commit e271e87 (``_old_*`` below and ``tests/data_reference.py``,
which the tests check the fast paths against). Each path's output is checked identical (token ids, masks,
packed rows) before its time counts.

Timed: tokenisation + masking + packing of records already loaded by ``datasets`` (the jsonl -> Arrow load is
the same call in both paths and cached by datasets; its time is reported apart). Each current-path run
reads a fresh copy of the file, so datasets' map cache is cold; ``warm`` re-reads a cached one.

    python benchmarks/data_prep.py                       # 100k conversations, ~5 min on 2 cores
    python benchmarks/data_prep.py --n 20000 --old-n 5000 --out /tmp/dp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = "benchmarks/results/data_prep_cpu.json"

from rad_ds.data import tokenization as T
from rad_ds.data.chat_mask import prefix_spans
from rad_ds.data.packing import _best_fit_decreasing, pack_documents
from rad_ds.data.sources import DataError, load_records
from tests.data_reference import answer_target, reference_best_fit, reference_pieces

# -- the former path (rad_ds/data/tokenization.py and packing.py at e271e87, trimmed to what runs here) --------


def _old_chat_doc(msgs, tok, mask_prompt, index, source):
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    text = tok.apply_chat_template(msgs, tokenize=False)
    if mask_prompt:
        spans = prefix_spans(msgs, tok, text)  # 2 renders per assistant turn, as before
        if spans is None:
            raise DataError(f"{source} record {index}: prefix")
        return answer_target(tok, text, spans)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    target = np.ones(len(ids), dtype=np.uint8)
    if len(ids):
        target[-1] = 0
    return ids, target


def _old_tokenize_records(records, tok, mask_prompt=True, min_tokens=2, batch_size=1000):
    docs, index = [], 0
    for batch in records.dataset.iter(batch_size=batch_size):
        values = batch[records.field]
        for j, msgs in enumerate(values):
            docs.append(_old_chat_doc(msgs, tok, mask_prompt, index + j, records.source))
        index += len(values)
    return [d for d in docs if len(d[0]) >= max(min_tokens, 1) and d[1].any()]


def _old_pack_documents(docs, seq_len, pad_id=0):
    pieces = reference_pieces(docs, seq_len)
    bins = reference_best_fit([len(p[0]) for p in pieces], seq_len)
    n = len(bins)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    target = np.zeros((n, seq_len), dtype=np.uint8)
    token = np.zeros((n, seq_len), dtype=np.uint8)
    for r, b in enumerate(bins):
        pos = 0
        for i in b:
            ids, tgt = pieces[i]
            input_ids[r, pos:pos + len(ids)] = ids
            target[r, pos:pos + len(ids)] = tgt
            token[r, pos:pos + len(ids)] = 1
            pos += len(ids)
    return input_ids, target, token


# -- synthetic conversations ---------------------------------------------------------------------------------


_WORD_TEXT = """the of and to a in is it you that he was for on are with as I his they be at one have this from or had
by hot word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look more day
could go come did number sound no most people my over know water than call first who may down side been now find
any new work part take get place made live where after back little only round man year came show every good me
give our under name very through just form sentence great think say help low line differ turn cause much mean
before move right boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye never last let thought
city tree cross farm hard start might story saw far sea draw left late run don't while press close night real life
few north open seem together next white children begin got walk example ease paper group always music those both
mark often letter until mile river car feet care second book carry took science eat room friend began idea fish
mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young ready above
ever red list though feel talk bird soon body dog family direct pose leave song measure door product black short
numeral class wind question happen complete ship area half rock order fire south problem piece told knew pass since
top whole king space heard best hour better true during hundred five remember step early hold west ground interest
reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay against pattern
slow center love person money serve appear road map rain rule govern pull cold notice voice unit power town fine
certain fly fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done
beauty drive stood contain front teach week final gave green oh quick develop ocean warm free minute strong special
mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object decide
surface deep moon island foot system busy test record boat common gold possible plane stead dry wonder laugh
thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill east paint language
among"""
WORDS = _WORD_TEXT.split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat records: 1-4 user/assistant turns (users 5-40 words, answers 10-100), a system prompt in
    30%; common English words with Zipf-like frequencies, some numbers and punctuation."""
    rng = np.random.default_rng(seed)
    vocab = WORDS + [str(i) for i in range(100)] + [",", ".", "?", ":", "(", ")"]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 0.8
    p = p[rng.permutation(len(vocab))]
    p /= p.sum()

    def sentence(lo, hi):
        return " ".join(vocab[i] for i in rng.choice(len(vocab), size=int(rng.integers(lo, hi + 1)), p=p))

    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": sentence(4, 15)}] if rng.random() < 0.3 else []
        for _ in range(int(rng.integers(1, 5))):
            msgs.append({"role": "user", "content": sentence(5, 40)})
            msgs.append({"role": "assistant", "content": sentence(10, 100)})
        out.append({"messages": msgs})
    return out


# -- runs ----------------------------------------------------------------------------------------------------


def _copy(src: Path, tmp: Path, tag: str) -> Path:
    """A fresh copy (a new datasets fingerprint: the current path's map cache is cold for it)."""
    dst = tmp / f"chat_{tag}.jsonl"
    shutil.copyfile(src, dst)
    return dst


def run_old(path: Path, tok, seq_len: int):
    t0 = time.perf_counter()
    recs = load_records(str(path))
    t1 = time.perf_counter()
    docs = _old_tokenize_records(recs, tok)
    t2 = time.perf_counter()
    rows = _old_pack_documents(docs, seq_len, tok.pad_token_id or 0)
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "tokenise_s": t2 - t1, "pack_s": t3 - t2}, docs, rows


def run_new(path: Path, tok, seq_len: int, num_proc: int, tokenizer_threads: bool):
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if tokenizer_threads else "false"
    t0 = time.perf_counter()
    recs = load_records(str(path))
    t1 = time.perf_counter()
    docs = T.tokenize_documents(recs, tok, num_proc=num_proc)
    t2 = time.perf_counter()
    packed = pack_documents(docs, seq_len, "greedy", tok.pad_token_id or 0)
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "tokenise_s": t2 - t1, "pack_s": t3 - t2}, docs, packed


def _same(old_docs, new_docs, old_rows, packed) -> bool:
    if len(old_docs) != len(new_docs):
        return False
    lengths = np.asarray([len(d[0]) for d in old_docs])
    if not np.array_equal(lengths, new_docs.lengths):
        return False
    if not (np.array_equal(np.concatenate([d[0] for d in old_docs]), new_docs.ids)
            and np.array_equal(np.concatenate([d[1] for d in old_docs]), new_docs.target)):
        return False
    return all(np.array_equal(a, b) for a, b in zip(old_rows, (packed.input_ids, packed.target, packed.token)))


def tokenizer_floor(path: Path, tok) -> dict:
    """The tokenizer's own work, which both paths do: the Rust ``encode_batch`` (with offsets) of the
    rendered conversations, 1 thread, batches of 1000 (rendering not timed)."""
    from rad_ds.data.chat_mask import render

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    convs = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    texts = render(tok, convs)
    t = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok.backend_tokenizer.encode_batch(texts[i:i + 1000], add_special_tokens=False)
    dt = time.perf_counter() - t
    return {"conversations": len(texts), "encode_s": dt, "conv_per_s": len(texts) / dt}


def best_fit_worst_case(n: int, seq_len: int) -> dict:
    """Pieces all longer than half a row: no two share a bin, so every bin stays open and the former
    sorted list grows to n (insort/pop: O(n) each)."""
    lengths = np.random.default_rng(1).integers(seq_len // 2 + 1, seq_len, size=n).tolist()
    t = time.perf_counter()
    old = reference_best_fit(lengths, seq_len)
    t_old = time.perf_counter() - t
    t = time.perf_counter()
    new = _best_fit_decreasing(lengths, seq_len)
    t_new = time.perf_counter() - t
    same = all(len(b) == 1 for b in old) and np.array_equal(np.argsort(new), [b[0] for b in old])
    return {"pieces": n, "seq_len": seq_len, "old_s": t_old, "new_s": t_new, "speedup": t_old / t_new,
            "same_bins": bool(same)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _parser():
    from rad_ds.core.provenance import RENDER_HELP

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="conversations for the current path")
    ap.add_argument("--old-n", type=int, default=100_000, help="conversations for the former path (a prefix)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--tokenizer", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--procs", default="1,2", help="num_proc values of the current path")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--render", action="store_true", help=RENDER_HELP)
    return ap


def _tokenizer(name: str):
    """SmolLM2's tokenizer from the embedded model, or the tests' byte tokenizer (``tiny``)."""
    if name == "smollm2":
        from transformers import AutoTokenizer

        from rad_ds.models.conversion import ensure_embedded

        return AutoTokenizer.from_pretrained(str(ensure_embedded("embedded:smollm2")[0]))
    from tests.distill_helpers import byte_tokenizer

    return byte_tokenizer()


def _write_conversations(tmp: Path, n: int, old_n: int) -> tuple[Path, Path]:
    """``n`` conversations as ``chat.jsonl`` and their first ``old_n`` as ``chat_old.jsonl`` (the former path's)."""
    t = time.perf_counter()
    convs = conversations(n)
    src = tmp / "chat.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in convs))
    old_src = tmp / "chat_old.jsonl"
    old_src.write_text("".join(json.dumps(c) + "\n" for c in convs[:old_n]))
    print(f"built {n} conversations in {time.perf_counter() - t:.1f} s", flush=True)
    return src, old_src


def _former_row(old_src: Path, tmp: Path, tok, args) -> tuple[dict, bool]:
    """The former path's row, and whether the current path gives identical docs and packed rows on the same file."""
    old_t, old_docs, old_rows = run_old(old_src, tok, args.seq_len)
    old_tokens = int(sum(len(d[0]) for d in old_docs))
    old_prep = old_t["tokenise_s"] + old_t["pack_s"]
    row = {"path": "former (1 process)", "conversations": args.old_n, "tokens": old_tokens, **old_t,
           "conv_per_s": args.old_n / old_prep, "tokens_per_s": old_tokens / old_prep, "identical": True}
    print(row, flush=True)
    _, new_docs, packed = run_new(_copy(old_src, tmp, "check"), tok, args.seq_len, 1, True)
    return row, _same(old_docs, new_docs, old_rows, packed)


def _current_row(label: str, path: Path, tok, args, num_proc: int, threads: bool, identical: bool,
                 former_conv_per_s: float) -> dict:
    """One timed run of the current path on ``path``, as a row (speed-up over the former path)."""
    times, docs, packed = run_new(path, tok, args.seq_len, num_proc, threads)
    tokens = int(docs.lengths.sum())
    prep = times["tokenise_s"] + times["pack_s"]
    row = {"path": label, "conversations": args.n, "tokens": tokens, **times,
           "conv_per_s": args.n / prep, "tokens_per_s": tokens / prep,
           "identical": identical, "rows": len(packed), "speedup": (args.n / prep) / former_conv_per_s}
    print(row, flush=True)
    return row


def _current_rows(src: Path, tmp: Path, tok, args, identical: bool, former_conv_per_s: float) -> list[dict]:
    """The current path per ``--procs`` on a fresh copy each (cold map cache), then warm on a cached copy."""
    configs = [(int(p), int(p) == 1) for p in args.procs.split(",")]
    if (1, True) in configs:
        configs.insert(configs.index((1, True)), (1, False))  # 1 process with the tokenizer on 1 thread
    rows = []
    for num_proc, threads in configs:
        path = _copy(src, tmp, f"{num_proc}_{int(threads)}")
        label = f"current, num_proc={num_proc}" + ("" if num_proc > 1 else
                                                   (", tokenizer threads on" if threads else ", 1 thread"))
        rows.append(_current_row(label, path, tok, args, num_proc, threads, identical, former_conv_per_s))
    warm_path = tmp / "chat_1_1.jsonl"
    if warm_path.exists():
        rows.append(_current_row("current, warm (datasets' cache)", warm_path, tok, args, 1, True, identical,
                                 former_conv_per_s))
    return rows


def main(argv=None):
    from rad_ds.core.provenance import provenance, render_only, write_results

    if render_only(render, DEFAULT_OUT, argv):
        return
    args = _parser().parse_args(argv)

    import datasets

    datasets.disable_progress_bars()
    tok = _tokenizer(args.tokenizer)
    T.MIN_RECORDS_PER_PROC = 1000
    tmp = Path(tempfile.mkdtemp(prefix="rad_ds_data_prep_"))
    try:
        src, old_src = _write_conversations(tmp, args.n, args.old_n)
        former, identical = _former_row(old_src, tmp, tok, args)
        rows = [former, *_current_rows(src, tmp, tok, args, identical, former["conv_per_s"])]
        floor = tokenizer_floor(old_src, tok)
        print(floor, flush=True)
        worst = best_fit_worst_case(100_000, args.seq_len)
        print(worst, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import tokenizers
    import transformers

    result = {
        "benchmark": "data_prep", "provenance": provenance(), "tokenizer": args.tokenizer, "seq_len": args.seq_len,
        "cpu": _cpu_name(), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "python": platform.python_version(),
        "datasets": datasets.__version__, "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__, "rows": rows, "tokenizer_floor": floor, "best_fit_worst_case": worst,
    }
    print(write_results(args.out, result, render, indent=1).read_text())


def render(result: dict) -> str:
    """The results markdown, from the JSON alone (``--render`` rewrites the .md from it)."""
    from rad_ds.core.provenance import provenance_line

    rows, floor, worst = result["rows"], result["tokenizer_floor"], result["best_fit_worst_case"]
    former = rows[0]["conv_per_s"]
    best = max(r.get("speedup", 1.0) for r in rows if "warm" not in r["path"])
    cores = result["cpus"]
    ceiling = cores * floor["conv_per_s"] / former
    md = [
        (f"# Data preparation throughput (cpu, {cores} cores, tokenizer {result['tokenizer']}, "
         f"seq_len {result['seq_len']})"),
        "",
        ("Tokenise + chat mask + pack of records already loaded by datasets (the jsonl -> Arrow load is the same "
         "call in both paths; `load` column). Speed-up = conversations/s over the former path's. `identical`: "
         "token ids, masks and packed rows equal the former path's on its conversations."),
        "",
        ("| path | conversations | tokens | load (s) | tokenise (s) | pack (s) | conversations/s | tokens/s | "
         "speed-up | identical |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        md.append(f"| {r['path']} | {r['conversations']} | {r['tokens']} | {r['load_s']:.1f} | {r['tokenise_s']:.1f} | "
                  f"{r['pack_s']:.2f} | {r['conv_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                  f"{r.get('speedup', 1.0):.2f}x | {'yes' if r['identical'] else 'NO'} |")
    md += ["", (f"The tokenizer's own work, which both paths do (Rust `encode_batch` with offsets of the rendered "
                f"conversations, 1 thread): {floor['conv_per_s']:.0f} conversations/s per core, "
                f"{floor['conv_per_s'] / former:.1f}x the former path; so {cores} cores cannot prepare faster than "
                f"about {ceiling:.1f}x the former path, whatever else is removed.")]
    md += ["", (f"Best-fit alone, worst case for the former list ({worst['pieces']} pieces all longer than half a "
                f"row): former {worst['old_s']:.2f} s, current {worst['new_s']:.2f} s ({worst['speedup']:.1f}x, "
                f"same bins: {'yes' if worst['same_bins'] else 'NO'}).")]
    md += ["", (f"Machine: {cores} cores ({result['cpu']}), no GPU, shared with other work (load average "
                f"{result['load_average_at_end'][0]:.1f} at the end); python {result['python']}, datasets "
                f"{result['datasets']}, transformers {result['transformers']}, tokenizers {result['tokenizers']}.")]
    met = "met" if best >= 10 else "not met"
    md += ["", (f"**Target >= 10x: {met}; cold preparation is {best:.1f}x the former path here**, against a "
                f"ceiling of about {ceiling:.1f}x set by the tokenizer on {cores} cores."), "",
           provenance_line(result["provenance"])]
    return "\n".join(md) + "\n"

if __name__ == "__main__":
    main()
