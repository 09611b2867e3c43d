"""``evaluate``: every model on every task, side by side, into ``results.json`` and ``results.md``.

Models are evaluated one after another; under ``deepspeed`` / ``torchrun`` each rank holds a whole copy of
the model and takes its share of the batches (data parallel), and the per-sample records are gathered,
so 1 and N ranks give the same scores. All data is read and checked before any model is loaded.
"""

from __future__ import annotations

import datetime
import gc
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rad_ds.core import dist
from rad_ds.core.dtypes import dtype_name, to_dtype
from rad_ds.core.layers import layers_string
from rad_ds.core.outputs import claim
from rad_ds.decoding.eos import model_eos_ids

from .batching import gather, generate_batch, length_sorted_batches, my_batches
from .config import GENERATION_TASKS, TASKS, EvalConfig
from .cruxeval import CruxEvalTask
from .gsm8k import Gsm8kTask
from .humaneval import HumanEvalTask
from .perplexity import load_texts, timed_window_nll, windows
from .perplexity import summarize as ppl_summary
from .results import WandbLog, markdown, write_results, write_samples
from .sandbox import SandboxLimits, default_python, sandbox_guards, sandbox_uid
from .speed import SkipMask, decode_prompts, mask_from_report, usable_mask
from .speed import summarize as speed_summary
from .tasks import accuracy, cut_at_stop

logger = logging.getLogger(__name__)



def _mask(cfg: EvalConfig) -> SkipMask | None:
    if cfg.report:
        return mask_from_report(cfg.report, cfg.k)
    if cfg.skip_layers:
        return SkipMask(tuple(sorted(set(cfg.skip_layers))), "--skip-layers")
    return None


def _labels(models: list[str]) -> list[str]:
    short = [m if m.startswith("embedded:") else Path(m).name or m for m in models]
    return [s if short.count(s) == 1 else m for s, m in zip(short, models)]


def _encode(tok, sample, chat: bool) -> torch.Tensor:
    from rad_ds.decoding.prompts import encode

    return encode(tok, "chat", sample.messages) if chat else encode(tok, "text", sample.text, chat=False)


class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False)

    def update(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _sum_over_ranks(*values: float) -> list[float]:
    parts = gather([tuple(values)])
    return [sum(p[i] for p in parts) for i in range(len(values))]


def run_generation_task(model, tok, task, samples, cfg: EvalConfig, chat: bool, rank: int, world: int,
                        sandbox: SandboxLimits, label: str) -> tuple[dict, list[dict]]:
    max_new = cfg.max_new_tokens or task.default_max_new_tokens
    prompts = [_encode(tok, s, chat) for s in samples]
    batches = length_sorted_batches([p.numel() for p in prompts], cfg.batch_size)
    mine = my_batches(batches, rank, world)
    stops = () if chat else task.plain_stop
    local, tokens, seconds = [], 0, 0.0
    bar = _Progress(cfg.progress and rank == 0, len(mine), f"{label} {task.name}")
    for b in mine:
        gens, sec = generate_batch(model, tok, [prompts[i] for i in b], max_new, stops)
        outs = [cut_at_stop(g.text, stops) for g in gens]
        recs = task.score([samples[i] for i in b], outs, chat, sandbox)
        for i, g, o, r in zip(b, gens, outs, recs):
            prompt = samples[i].messages[-1]["content"] if chat else samples[i].text
            local.append({**r, "prompt": prompt, "output": o, "new_tokens": g.new_tokens,
                          "truncated_prompt": g.truncated_prompt})
        tokens += sum(g.new_tokens for g in gens)
        seconds += sec
        bar.update()
    bar.close()
    records = sorted(gather(local), key=lambda r: r["index"])
    tokens, seconds = _sum_over_ranks(tokens, seconds)
    score, se = accuracy(records)
    row = {"task": task.name, "n": len(records), "metric": task.metric, "score": score, "stderr": se,
           "tokens_per_second": tokens / seconds if seconds > 0 else None, "new_tokens": int(tokens),
           "seconds": seconds, "source": task.source(cfg.data.get(task.name)), "chat": chat,
           "max_new_tokens": max_new, "truncated_prompts": sum(r["truncated_prompt"] for r in records),
           "details": {}}
    if row["truncated_prompts"] and rank == 0:
        logger.warning("%s %s: %d prompt(s) longer than the context minus %d new tokens were cut from the left",
                       label, task.name, row["truncated_prompts"], max_new)
    if task.name == "gsm8k":
        row["few_shot"] = cfg.few_shot
    if task.name in ("humaneval", "cruxeval"):  # how the verdicts came about (sandbox status / check used)
        key = "status" if task.name == "humaneval" else "checked_by"
        outcomes = {}
        for r in records:
            outcomes[r[key]] = outcomes.get(r[key], 0) + 1
        row["details"]["outcomes"] = dict(sorted(outcomes.items()))
    return row, records


def run_ppl(model, tok, texts: list[str], cfg: EvalConfig, rank: int, world: int, label: str, data: str | None):
    ctx = getattr(model.config, "max_position_embeddings", None) or cfg.ppl_window
    window = min(cfg.ppl_window, ctx)
    stride = min(cfg.ppl_stride or window, window)
    ids = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    ws = windows([x.numel() for x in ids], window, stride)
    batches = length_sorted_batches([w.end - w.begin for w in ws], cfg.batch_size)
    mine = my_batches(batches, rank, world)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    local, seconds = [], 0.0
    bar = _Progress(cfg.progress and rank == 0, len(mine), f"{label} ppl")
    for b in mine:
        res, sec = timed_window_nll(model, ids, [ws[i] for i in b], pad)
        local += [(i, nll, n) for i, (nll, n) in zip(b, res)]
        seconds += sec
        bar.update()
    bar.close()
    per_window = [(ws[i], nll, n) for i, nll, n in gather(local)]
    (seconds,) = _sum_over_ranks(seconds)
    s = ppl_summary(per_window, texts, seconds)
    row = {"task": "ppl", "n": s.documents, "metric": "perplexity", "score": s.perplexity, "stderr": None,
           "tokens_per_second": s.tokens / seconds if seconds > 0 else None, "seconds": seconds,
           "source": data or "HumanEval programs + reasoning-gym GSM solutions (built in)",
           "details": {"nll_per_token": s.nll_per_token, "bits_per_byte": s.bits_per_byte, "tokens": s.tokens,
                       "bytes": s.bytes, "window": window, "stride": stride}}
    return row


def run_speed(model, tok, cfg: EvalConfig, mask: SkipMask | None, rank: int, world: int, chat: bool):
    from rad_ds.decoding.prompts import load_prompts

    max_new = cfg.max_new_tokens or 64
    prompts = load_prompts(tok, cfg.data.get("speed"), cfg.speed_prompts, cfg.seed, chat, max_new,
                           getattr(model.config, "max_position_embeddings", None), what="--data speed")
    use, why_not = usable_mask(model, mask)
    eos = sorted(model_eos_ids(tok, model))
    rows = decode_prompts(model, prompts[rank::world], max_new, eos, use, cfg.draft_len)
    s = speed_summary(gather(rows))
    details = {"plain_tokens_per_second": s["plain_tokens_per_second"], "prompts": s["prompts"],
               "plain_tokens": s["plain_tokens"], "max_new_tokens": max_new, "draft_len": cfg.draft_len}
    if use is not None:
        details["speculative"] = {"layers": sorted(use), "mask_source": mask.source,
                                  "tokens_per_second": s["spec_tokens_per_second"],
                                  "acceptance_rate": s["acceptance_rate"],
                                  "mean_accepted_length": s["mean_accepted_length"], "speedup": s["speedup"],
                                  "same_tokens": s["same_tokens"]}
    elif why_not:
        details["speculative_skipped"] = why_not
        logger.warning("speculative decoding skipped for this model: %s", why_not)
    return {"task": "speed", "n": s["prompts"], "metric": "tokens/s", "score": s["plain_tokens_per_second"],
            "stderr": None, "tokens_per_second": s["plain_tokens_per_second"],
            "source": cfg.data.get("speed") or "diagnosis prompt mix (GSM-style math + HumanEval)",
            "details": details}


def load_task_data(cfg: EvalConfig) -> dict:
    """Every task's samples (or texts), read and checked before any model is loaded."""
    out = {}
    for name in cfg.tasks:
        data = cfg.data.get(name)
        if name == "gsm8k":
            task = Gsm8kTask(cfg.few_shot)
        elif name == "humaneval":
            task = HumanEvalTask()
        elif name == "cruxeval":
            task = CruxEvalTask()
        elif name == "ppl":
            out[name] = (None, load_texts(data, cfg.limit, cfg.seed))
            continue
        else:
            if data:
                from rad_ds.decoding.prompts import rows_from_file

                rows_from_file(data, what="--data speed")  # fail now on an unusable file
            out[name] = (None, None)
            continue
        out[name] = (task, task.load(data, cfg.limit, cfg.seed))
    return out


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate every model on every task (collective); ``cfg.out`` is claimed first (``core.outputs``: a
    finished evaluation there is replaced, samples included, only with ``overwrite``)."""
    t_start = time.perf_counter()
    cfg.validate()
    rank, world = dist.init_from_env()
    with claim(cfg.out, "evaluation", overwrite=cfg.overwrite, rank=rank) as output:
        results = _evaluate(cfg, rank, world, t_start)
        output.finish()
    return results


def _evaluate(cfg: EvalConfig, rank: int, world: int, t_start: float) -> dict:
    from rad_ds.models.conversion import load_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = to_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    mask = _mask(cfg)
    data = load_task_data(cfg)
    sandbox = SandboxLimits(timeout_s=cfg.timeout, memory_mb=cfg.sandbox_memory_mb, workers=cfg.sandbox_workers,
                            python=cfg.sandbox_python, disk_mb=cfg.sandbox_disk_mb)
    code_tasks = [t for t in cfg.tasks if t in ("humaneval", "cruxeval")]
    guards = sandbox_guards(sandbox) if code_tasks else []
    if code_tasks and rank == 0 and not {"landlock-fs", "netns"} <= set(guards):
        logger.warning("the sandbox runs with %s only (no Landlock or network namespace on this machine): "
                       "generated code is contained by rlimits and Python-level hooks", ", ".join(guards))
    log = WandbLog(cfg.wandb and rank == 0, cfg.wandb_project, cfg.wandb_run, out, asdict(cfg))
    labels = _labels(cfg.models)
    rows, models = [], {}
    for label, path in zip(labels, cfg.models):
        model, tok = load_model(path, dtype=dtype)  # an embedded model is imported once, under a file lock
        if tok is None:
            raise ValueError(f"--model {path}: no tokenizer saved with the model; save one next to the weights")
        model.to(device).eval()
        chat = cfg.chat and bool(getattr(tok, "chat_template", None))
        models[label] = {"path": path, "layers": layers_string(model.config),
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "dtype": dtype_name(dtype), "chat_template": chat}
        for name in cfg.tasks:
            task, payload = data[name]
            t0 = time.perf_counter()
            if name in GENERATION_TASKS:
                row, records = run_generation_task(model, tok, task, payload, cfg, chat, rank, world, sandbox, label)
                if rank == 0:
                    write_samples(out, label, name, records)
            elif name == "ppl":
                row = run_ppl(model, tok, payload, cfg, rank, world, label, cfg.data.get("ppl"))
            else:
                row = run_speed(model, tok, cfg, mask, rank, world, chat)
            row = {"model": label, **row, "wall_seconds": time.perf_counter() - t0}
            rows.append(row)
            log.row(row)
            if rank == 0:
                logger.info("%s %s: %s = %.4f (n=%d)", label, name, row["metric"], row["score"], row["n"])
        del model
        gc.collect()
    results = {
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "world_size": world, "device": device.type, "config": asdict(cfg), "models": models, "results": rows,
        "sandbox": {"guards": guards, "timeout_s": cfg.timeout, "memory_mb": cfg.sandbox_memory_mb,
                    "disk_mb": cfg.sandbox_disk_mb, "uid": sandbox_uid(sandbox),
                    "python": sandbox.python or default_python()} if guards else None,
        "seconds": time.perf_counter() - t_start,
    }
    if rank == 0:
        j, m = write_results(out, results)
        print(f"\n{markdown(results)}\nresults: {j}  table: {m}  samples: {out / 'samples'}")
        log.finish(results)
    dist.barrier()
    return results


__all__ = ["EvalConfig", "TASKS", "evaluate", "load_task_data"]
