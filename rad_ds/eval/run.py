"""``evaluate``: every model on every task, side by side, into ``results.json`` and ``results.md``.

Models are evaluated one after another; under ``deepspeed`` / ``torchrun`` each rank holds a whole copy of
the model and takes its share of the batches (data parallel), and the per-sample records are gathered,
so 1 and N ranks give the same scores. All data is read and checked before any model is loaded. The speed
task is timed after that loop, the models round-robin on the same prompts (``SpeedTask``), so the loaded
models are held until then (``speed_interleave=false``: each is timed alone while it is loaded).
"""

from __future__ import annotations

import datetime
import gc
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rad_ds.core import dist
from rad_ds.core.batching import length_sorted_batches, pad_id
from rad_ds.core.dtypes import dtype_name, to_dtype
from rad_ds.core.layers import layers_string
from rad_ds.core.outputs import claim
from rad_ds.core.progress import progress
from rad_ds.decoding.prompts import encode, rows_from_file
from rad_ds.models.conversion import load_model

from .batching import gather, generate_batch, my_batches
from .config import TASKS, EvalConfig
from .perplexity import load_texts, timed_window_nll, windows
from .perplexity import summarize as ppl_summary
from .registry import KINDS, REGISTRY
from .results import WandbLog, markdown, write_results, write_samples
from .sandbox import SandboxLimits, default_python, sandbox_guards, sandbox_uid
from .speed import SkipMask, SpeedTask, mask_from_report
from .tasks import accuracy, accuracy_interval, cut_at_stop

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
    return encode(tok, "chat", sample.messages) if chat else encode(tok, "text", sample.text, chat=False)


class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled and total:
            self.bar = progress(total, desc, "batch", leave=False)  # a bar on a terminal, log lines in a log

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
                        sandbox: SandboxLimits, label: str) -> tuple[list[dict], list[dict]]:
    """Greedy generation for every sample, scored by the task; (the task's rows, the per-sample records)."""
    chat = chat and task.chat_prompts  # a completion task prompts with plain text whatever the template
    max_new = cfg.max_new_tokens or task.default_max_new_tokens
    ctx = getattr(model.config, "max_position_embeddings", None)
    samples = task.prepare(samples, tok, chat, ctx - max_new if ctx else None)
    prompts = [_encode(tok, s, chat) for s in samples]
    batches = length_sorted_batches([p.numel() for p in prompts], cfg.batch_size, task.batch_tokens)
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
           "ci95": accuracy_interval(records),
           "tokens_per_second": tokens / seconds if seconds > 0 else None, "new_tokens": int(tokens),
           "seconds": seconds, "source": task.source(cfg.data.get(task.name)), "chat": chat,
           "max_new_tokens": max_new, "truncated_prompts": sum(r["truncated_prompt"] for r in records),
           "details": {}}
    if row["truncated_prompts"] and rank == 0:
        logger.warning("%s %s: %d prompt(s) longer than the context minus %d new tokens were cut from the left",
                       label, task.name, row["truncated_prompts"], max_new)
    return task.rows(row, records), records


def run_ppl(model, tok, texts: list[str], cfg: EvalConfig, rank: int, world: int, label: str, data: str | None):
    ctx = getattr(model.config, "max_position_embeddings", None) or cfg.ppl_window
    window = min(cfg.ppl_window, ctx)
    stride = min(cfg.ppl_stride or window, window)
    ids = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    ws = windows([x.numel() for x in ids], window, stride)
    batches = length_sorted_batches([w.end - w.begin for w in ws], cfg.batch_size)
    mine = my_batches(batches, rank, world)
    pad = pad_id(tok)
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
    s = ppl_summary(per_window, texts, seconds, cfg.bootstrap, cfg.seed)
    row = {"task": "ppl", "n": s.documents, "metric": "perplexity", "score": s.perplexity, "stderr": None,
           "ci95": s.ci95, "tokens_per_second": s.tokens / seconds if seconds > 0 else None, "seconds": seconds,
           "source": data or "HumanEval programs + reasoning-gym GSM solutions (built in)",
           "details": {"nll_per_token": s.nll_per_token, "bits_per_byte": s.bits_per_byte, "tokens": s.tokens,
                       "bytes": s.bytes, "window": window, "stride": stride,
                       "interval": {"method": "percentile bootstrap", "unit": "document", "resamples": cfg.bootstrap,
                                    "seed": cfg.seed, "level": 0.95}}}
    return row


def load_task_data(cfg: EvalConfig) -> dict:
    """Every task's samples (or texts), read and checked before any model is loaded."""
    out = {}
    for name in cfg.tasks:
        spec, data = REGISTRY[name], cfg.data.get(name)
        if spec.kind == "generation":
            task = spec.build(cfg)
            out[name] = (task, task.load(data, cfg.limit, cfg.seed))
        elif spec.kind == "ppl":
            out[name] = (None, load_texts(data, cfg.limit, cfg.seed))
        elif spec.kind == "speed":
            if data:
                rows_from_file(data, what="--data speed")  # fail now on an unusable file
            out[name] = (None, None)
        else:
            raise ValueError(f"task {name}: no loader for a {spec.kind} task")
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


@dataclass
class _ModelRun:
    """One loaded model and what its tasks' runners need."""
    cfg: EvalConfig
    rank: int
    world: int
    out: Path
    sandbox: SandboxLimits
    speed: SpeedTask
    label: str
    model: object
    tok: object
    chat: bool


def _run_generation(m: _ModelRun, name: str, task, samples) -> list[dict]:
    new, records = run_generation_task(m.model, m.tok, task, samples, m.cfg, m.chat, m.rank, m.world, m.sandbox,
                                       m.label)
    task.figures(m.out, m.label, new, write=m.rank == 0)
    if m.rank == 0:
        write_samples(m.out, m.label, name, records)
    return new


def _run_ppl(m: _ModelRun, name: str, task, texts) -> list[dict]:
    return [run_ppl(m.model, m.tok, texts, m.cfg, m.rank, m.world, m.label, m.cfg.data.get(name))]


def _run_speed(m: _ModelRun, name: str, task, payload) -> None:
    """Timed after the model loop, round-robin over the models (``SpeedTask`` holds this one): no rows now."""
    m.speed.add(m.label, m.model, m.tok, m.chat)


# the runner of each task kind (``registry.KINDS``): (model run, task name, task, its data) -> rows, or None
KIND_RUNNERS = {"generation": _run_generation, "ppl": _run_ppl, "speed": _run_speed}
if set(KIND_RUNNERS) != set(KINDS):
    raise RuntimeError(f"eval runner: task kinds {sorted(set(KINDS) ^ set(KIND_RUNNERS))} lack a runner or a kind")


def _checked_guards(cfg: EvalConfig, sandbox: SandboxLimits, rank: int) -> list[str]:
    """The sandbox guards this machine gives (none without a code task), with a warning when they are few."""
    code_tasks = [t for t in cfg.tasks if REGISTRY[t].is_code]
    guards = sandbox_guards(sandbox) if code_tasks else []
    if code_tasks and rank == 0 and not {"landlock-fs", "netns"} <= set(guards):
        logger.warning("the sandbox runs with %s only (no Landlock or network namespace on this machine): "
                       "generated code is contained by rlimits and Python-level hooks", ", ".join(guards))
    return guards


def _add_rows(rows: list[dict], log: WandbLog, new: list[dict], label: str, name: str, wall: float,
              rank: int) -> None:
    for i, row in enumerate(new):  # further rows (passkey's per context) share the first one's time
        row = {"model": label, **row, "wall_seconds": wall if i == 0 else None}
        rows.append(row)
        log.row(row)
        if rank == 0:
            logger.info("%s %s: %s = %.4f (n=%d)", label, name, row["metric"], row["score"], row["n"])


def _evaluate(cfg: EvalConfig, rank: int, world: int, t_start: float) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = to_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    mask = _mask(cfg)
    data = load_task_data(cfg)
    sandbox = SandboxLimits(timeout_s=cfg.timeout, memory_mb=cfg.sandbox_memory_mb, workers=cfg.sandbox_workers,
                            python=cfg.sandbox_python, disk_mb=cfg.sandbox_disk_mb)
    guards = _checked_guards(cfg, sandbox, rank)
    log = WandbLog(cfg.wandb.enabled and rank == 0, cfg.wandb.project, cfg.wandb.run, out, asdict(cfg))
    labels = _labels(cfg.models)
    rows, models = [], {}
    speed = SpeedTask(cfg, mask, rank, world)
    for label, path in zip(labels, cfg.models):
        model, tok = load_model(path, dtype=dtype)  # an embedded model is imported once, under a file lock
        if tok is None:
            raise ValueError(f"--model {path}: no tokenizer saved with the model; save one next to the weights")
        model.to(device).eval()
        chat = cfg.chat and bool(getattr(tok, "chat_template", None))
        models[label] = {"path": path, "layers": layers_string(model.config),
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "dtype": dtype_name(dtype), "chat_template": chat}
        run = _ModelRun(cfg, rank, world, out, sandbox, speed, label, model, tok, chat)
        for name in cfg.tasks:
            task, payload = data[name]
            t0 = time.perf_counter()
            new = KIND_RUNNERS[REGISTRY[name].kind](run, name, task, payload)
            if new is not None:
                _add_rows(rows, log, new, label, name, time.perf_counter() - t0, rank)
        del model, run
        gc.collect()
    for row in speed.finish():
        rows.append(row)
        log.row(row)
        if rank == 0:
            logger.info("%s speed: %s = %.4f (n=%d)", row["model"], row["metric"], row["score"], row["n"])
    rows.sort(key=lambda r: (labels.index(r["model"]), cfg.tasks.index(r["task"])))  # the table's order
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
