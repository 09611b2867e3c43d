"""Named layer placements (rad_ds.selection) on tiny models, against oracles: MambaInLlama's published layer
lists for ``even``, attention and cosine written out by hand for ``cosine``, full-model logits for ``kl_probe``,
constructed layers whose redundancy is known (a zeroed o_proj); config errors; a distill run that takes its
layers from ``--student.placement=cosine``."""

from __future__ import annotations

import copy
import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rad_ds.core.config import ConfigError
from rad_ds.selection import (
    METHODS,
    Choice,
    SelectionError,
    attention_redundancy,
    calibration_tokens,
    choose_layers,
    even_layers,
    replacement_kl,
)
from tests.distill_helpers import byte_tokenizer, load_launcher, run_args, save_base, write_text_jsonl

LAYOUT = ["attention", "mamba2", "attention", "attention", "attention", "attention"]  # layer 1 already Mamba2
ATTN = [0, 2, 3, 4, 5]
REDUNDANCY = {0: 0.5, 2: 0.9, 3: 0.7, 4: 0.8, 5: 0.1}


def _report(d, layer_types=LAYOUT, redundancy=REDUNDANCY, ks=((2, [3, 5]),)):
    data = {"model": "tiny", "num_hidden_layers": len(layer_types), "layer_types": list(layer_types),
            "layers": [{"index": i, "type": t, "redundancy": redundancy.get(i) if t == "attention" else None}
                       for i, t in enumerate(layer_types)],
            "selections": [{"k": k, "layers": layers, "method": "bo_topk"} for k, layers in ks],
            "prompts": {"n": 3}, "evaluated_masks": 20, "seconds": 10.0,
            "seconds_breakdown": {"setup": 2.0, "search": 6.0, "recheck": 2.0}}
    p = d / "report.json"
    p.write_text(json.dumps(data))
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-layer tiny Llama imported as a hybrid with layer 1 already Mamba2, its tokenizer, calibration tokens."""
    from rad_ds.models.conversion import load_model
    from rad_ds.surgery import replace_attention

    d = tmp_path_factory.mktemp("selection")
    base = save_base(d, num_hidden_layers=6, seed=1)
    text = write_text_jsonl(d / "text.jsonl", n=12, min_words=4, max_words=12)
    model, tok = load_model(base)
    replace_attention(model, [1])
    model.eval()
    calib = calibration_tokens(str(text), tok, n=3, max_tokens=24)
    return SimpleNamespace(dir=d, base=base, text=text, model=model, tok=tok, calib=calib, report=_report(d))


def _make_config(args):
    """launchers/distill.py's config of a command line (imported here, not at collection: spawned ranks import
    this module)."""
    return load_launcher("distill").make_config(args)


def _inputs(t):
    return {"report": t.report, "calibration": t.calib, "seed": 3}


# -- every strategy -------------------------------------------------------------------------------------------

# the cost of choosing, worked out from the fixture: 3 calibration sequences, 5 attention layers; the report's
# 20 evaluated masks over its 3 prompts (+ one continuation each), 2 s of set-up and 6 s of search
FORWARD_PASSES = {"rad": 20 * 3 + 3, "single_skip": 5 * 3 + 3, "even": 0, "random": 0, "cosine": 3,
                  "kl_probe": 3 * (1 + 5)}
REPORT_SECONDS = {"rad": 2.0 + 6.0, "single_skip": 2.0 + 6.0 * 5 / 20}  # set-up + the single-skip masks' share


@pytest.mark.parametrize("method", METHODS)
def test_every_strategy_gives_k_distinct_sorted_attention_layers(method, tiny):
    for k in (1, 2, 4):
        if method == "rad" and k != 2:
            continue  # the report holds k=2 only
        t0 = time.perf_counter()
        c = choose_layers(method, k, tiny.model, **_inputs(tiny))
        wall = time.perf_counter() - t0
        assert isinstance(c, Choice) and c.method == method and c.k == k
        assert len(c.layers) == k and list(c.layers) == sorted(set(c.layers)), c.layers
        assert set(c.layers) <= set(ATTN), c.layers  # never the Mamba2 layer 1, never out of range
        assert c.forward_passes == FORWARD_PASSES[method]
        if method in REPORT_SECONDS:  # the diagnosis' time, read from its report
            assert c.seconds == pytest.approx(REPORT_SECONDS[method])
        else:  # the time of choosing, measured inside the call: more than nothing, at most the call itself
            assert 0 < c.seconds <= wall
        json.dumps(c.record())  # storable in a checkpoint / config.json
    again = choose_layers(method, 2 if method == "rad" else 3, tiny.model, **_inputs(tiny))
    assert again.layers == choose_layers(method, again.k, tiny.model, **_inputs(tiny)).layers  # reproducible


def test_weight_free_strategies_need_only_a_config(tiny):
    assert choose_layers("even", 2, tiny.model.config).layers == (0, 3)  # ATTN[0], ATTN[floor(5/2)]
    assert choose_layers("random", 2, tiny.model.config, seed=3).layers == \
        choose_layers("random", 2, tiny.model, seed=3).layers
    with pytest.raises(SelectionError, match="reads weights"):
        choose_layers("cosine", 1, tiny.model.config, calibration=tiny.calib)


# -- even: MambaInLlama's configs (jxiw/MambaInLlama, Llama-3-8B, 32 layers: the replaced `ssm_layers`) ---------

MIL_75 = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 20, 21, 22, 24, 25, 26, 28, 29, 30]
MIL_875 = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 24, 25, 26, 27, 28, 29, 30]


@pytest.mark.parametrize("n, k, expected", [
    (32, 8, [0, 4, 8, 12, 16, 20, 24, 28]),  # mamba2_llama/llama3_0.25_mamba2.yaml
    (32, 16, list(range(0, 32, 2))),  # llama3_0.50_mamba2.yaml
    (32, 24, MIL_75),  # llama3_0.75_mamba2_sft.yaml
    (32, 28, MIL_875),  # mamba_llama/llama3_0.875_mamba_sft.yaml
    (30, 2, [0, 15]), (30, 4, [0, 7, 15, 22]), (6, 4, [0, 1, 3, 4]), (5, 2, [0, 2]), (4, 1, [0]), (4, 4, [0, 1, 2, 3]),
])
def test_even_is_mambainllama_spacing(n, k, expected):
    assert list(even_layers(list(range(n)), k)) == expected
    cfg = SimpleNamespace(layer_types=["attention"] * n)
    assert list(choose_layers("even", k, cfg).layers) == expected


def test_random_is_seeded(tiny):
    cfg = SimpleNamespace(layer_types=["attention"] * 30)
    draws = {s: choose_layers("random", 4, cfg, seed=s).layers for s in range(5)}
    assert all(draws[s] == choose_layers("random", 4, cfg, seed=s).layers for s in draws)
    assert draws[0] != draws[1] and len(set(draws.values())) == 5
    assert choose_layers("random", 4, cfg, seed=0).record()["seed"] == 0


# -- rad and single_skip: from the diagnosis report ---------------------------------------------------------------

def test_rad_and_single_skip_read_the_report_and_its_cost(tiny):
    rad = choose_layers("rad", 2, tiny.model.config, report=tiny.report)
    assert rad.layers == (3, 5) and rad.forward_passes == 20 * 3 + 3 and rad.seconds == 8.0
    single = choose_layers("single_skip", 2, tiny.model.config, report=tiny.report)
    assert single.layers == (2, 4) and single.scores == REDUNDANCY  # the two highest acceptance rates
    assert single.forward_passes == 5 * 3 + 3 and single.seconds == pytest.approx(2.0 + 6.0 * 5 / 20)
    assert choose_layers("single_skip", 3, tiny.model.config, report=tiny.report).layers == (2, 3, 4)


def test_report_errors_name_the_file_and_the_fix(tiny, tmp_path):
    with pytest.raises(SelectionError) as e:
        choose_layers("rad", 3, tiny.model.config, report=tiny.report)
    msg = str(e.value)
    assert str(tiny.report) in msg and "launchers/diagnose.py" in msg and "--k 3" in msg and "\n" not in msg
    bare = _report(tmp_path, redundancy={})
    with pytest.raises(SelectionError) as e:
        choose_layers("single_skip", 2, tiny.model.config, report=bare)
    assert "single-skip scores" in str(e.value) and "launchers/diagnose.py" in str(e.value)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SelectionError, match="was made for model"):  # a report of another layout is refused
        choose_layers("rad", 2, tiny.model.config, report=_report(other, layer_types=["attention"] * 6))
    with pytest.raises(SelectionError, match="student.report"):
        choose_layers("rad", 2, tiny.model.config)


# -- cosine: against attention written out by hand -----------------------------------------------------------------

def _rot(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _attention_by_hand(model, i, h):
    """Layer i's attention output for the residual stream h (1, T, H): RMSNorm, RoPE, causal softmax, GQA."""
    cfg, layer = model.config, model.model.layers[i]
    w = layer.input_layernorm.weight
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w
    a = layer.self_attn
    T, nh, nkv, hd = h.shape[1], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ a.q_proj.weight.T).view(T, nh, hd).transpose(0, 1)
    k = (x @ a.k_proj.weight.T).view(T, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
    v = (x @ a.v_proj.weight.T).view(T, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / (cfg.rope_parameters or {}).get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    q, k = q * ang.cos() + _rot(q) * ang.sin(), k * ang.cos() + _rot(k) * ang.sin()
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + torch.full((T, T), float("-inf")).triu(1)
    out = (s.softmax(-1) @ v).transpose(0, 1).reshape(1, T, nh * hd)
    return out @ a.o_proj.weight.T


@torch.no_grad()
def test_cosine_equals_a_hand_computed_oracle(tiny):
    model = tiny.model
    assert (model.config.rope_parameters or {}).get("rope_type", "default") == "default"
    got = attention_redundancy(model, tiny.calib)
    assert sorted(got) == ATTN
    for i in ATTN:
        total, n = 0.0, 0
        for ids in tiny.calib:
            h = model.model(input_ids=ids[None], output_hidden_states=True).hidden_states[i]  # input of layer i
            y = h + _attention_by_hand(model, i, h)
            cos = (h * y).sum(-1) / (h.norm(dim=-1) * y.norm(dim=-1))
            total, n = total + cos.double().sum().item(), n + ids.numel()
        assert got[i] == pytest.approx(1 - total / n, abs=1e-5), i
    assert len(set(round(v, 6) for v in got.values())) == len(ATTN)  # a real spread, not a constant


@torch.no_grad()
def test_cosine_ranks_a_silent_attention_layer_most_redundant(tiny):
    model = copy.deepcopy(tiny.model)
    model.model.layers[4].self_attn.o_proj.weight.zero_()  # layer 4's attention adds nothing to the stream
    c = choose_layers("cosine", 1, model, calibration=tiny.calib)
    assert c.layers == (4,) and c.scores[4] == pytest.approx(0.0, abs=1e-6)
    assert min(v for i, v in c.scores.items() if i != 4) > 1e-4
    assert c.forward_passes == len(tiny.calib) and c.record()["calibration_sequences"] == len(tiny.calib)
    assert choose_layers("cosine", 1, tiny.model, calibration=tiny.calib).layers != (4,)  # it was the zeroing


# -- kl_probe -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_kl_probe_finds_the_one_layer_whose_replacement_matters(tiny):
    from rad_ds.surgery import replace_attention

    model = copy.deepcopy(tiny.model)
    for i in (0, 2, 4, 5):  # silent attention: replacing it by the MambaInLlama init (out_proj = O = 0) is exact
        model.model.layers[i].self_attn.o_proj.weight.zero_()
    scores = replacement_kl(model, tiny.calib)
    assert max(scores, key=scores.get) == 3 and scores[3] > 1e-4
    assert all(abs(scores[i]) < 1e-6 for i in (0, 2, 4, 5)), scores
    # oracle for layer 3: full forwards of the model and of a copy with layer 3 replaced, KL summed per token
    student = copy.deepcopy(model)
    replace_attention(student, [3], init="attention", allow_all=True, seed=0)
    total, n = 0.0, 0
    for ids in tiny.calib:
        t = F.log_softmax(model(ids[None]).logits.double(), -1)
        s = F.log_softmax(student(ids[None]).logits.double(), -1)
        total, n = total + F.kl_div(s, t, log_target=True, reduction="sum").item(), n + ids.numel()
    assert scores[3] == pytest.approx(total / n, rel=1e-4)
    c = choose_layers("kl_probe", 4, model, calibration=tiny.calib)
    assert c.layers == (0, 2, 4, 5) and c.forward_passes == len(tiny.calib) * (1 + len(ATTN))


def test_calibration_tokens_are_the_documents_as_distillation_tokenises_them(tiny):
    rows = [json.loads(line)["text"] for line in tiny.text.read_text().splitlines()]
    eos = tiny.tok.eos_token_id
    for ids, text in zip(tiny.calib, rows):
        want = (tiny.tok(text, add_special_tokens=True)["input_ids"] + [eos])[:24]
        assert ids.tolist() == want
    with pytest.raises(SelectionError, match="calibration tokens are empty"):
        choose_layers("cosine", 1, tiny.model, calibration=[])


# -- config -------------------------------------------------------------------------------------------------------


def _args(tmp_path, tiny, *extra):
    args = run_args(tmp_path, tiny.base, tiny.text, tmp_path / "out", steps=2)
    i = args.index("--layers")
    return args[:i] + args[i + 2:] + list(extra)


@pytest.mark.parametrize("extra, message", [
    (["--student.placement=nope", "--k", "1"], "student.placement = 'nope': use one of rad, single_skip, even"),
    (["--student.placement=cosine", "--k", "1", "--layers", "2"], "student.layers and student.placement=cosine"),
    (["--student.placement=even"], "student.placement=even needs student.k >= 1"),
    (["--student.placement=rad", "--k", "2"], "student.placement=rad reads a diagnosis report: give --report"),
    (["--student.placement=cosine", "--k", "1", "--report", "REPORT"], "student.report is read only by"),
])
def test_placement_config_errors_are_one_line(extra, message, tiny, tmp_path):
    extra = [str(tiny.report) if x == "REPORT" else x for x in extra]
    with pytest.raises(ConfigError) as e:
        _make_config(_args(tmp_path, tiny, *extra)).validate()
    assert message in str(e.value) and "\n" not in str(e.value)
    cfg = _make_config(_args(tmp_path, tiny, "--student.placement=single_skip", "--k", "2", "--report",
                              str(tiny.report)))
    assert cfg.validate().student.placement == "single_skip"


def test_pipeline_accepts_a_distill_placement(tmp_path):
    import yaml

    from rad_ds.pipeline import PipelineConfig

    conf = tmp_path / "rad.yaml"
    body = {"out": str(tmp_path / "o"), "k": 2, "diagnose": {"k": [2]},
            "distill": {"config": "configs/smollm2_demo.yaml", "student": {"placement": "cosine"}}}
    conf.write_text(yaml.safe_dump(body))
    st = PipelineConfig.load(conf).distill.student
    assert (st.placement, st.k, st.report, st.layers) == ("cosine", 2, None, None)  # the report is not read
    body["distill"]["student"]["placement"] = "single_skip"
    conf.write_text(yaml.safe_dump(body))
    st = PipelineConfig.load(conf).distill.student
    assert st.placement == "single_skip" and st.report.endswith("diagnosis/report.json")
    body["distill"].update({"teacher": {"path": "embedded:smollm2"}, "student": {"placement": "even"}})
    conf.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError) as e:
        PipelineConfig.load(conf)
    assert "distill.student.placement=even needs self-distillation" in str(e.value) and "\n" not in str(e.value)


# -- a distill run with --student.placement=cosine -----------------------------------------------------------------

def test_distill_replaces_the_layer_cosine_chose(tmp_path):
    from rad_ds.distill import distill
    from rad_ds.models.conversion import load_model
    from rad_ds.selection.calibration import MAX_TOKENS, N_SEQUENCES
    from tests.model_factories import tiny_hf_model

    hf = tiny_hf_model("llama", seed=2)
    with torch.no_grad():
        hf.model.layers[2].self_attn.o_proj.weight.zero_()  # the layer cosine must choose
    base = tmp_path / "base"
    hf.save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    text = write_text_jsonl(tmp_path / "text.jsonl", n=24)
    d = SimpleNamespace(base=base, text=text)
    cfg = _make_config(_args(tmp_path, d, "--student.placement=cosine", "--k", "1"))
    model, tok = load_model(base)
    expected = choose_layers("cosine", 1, model, calibration=calibration_tokens(str(text), tok, N_SEQUENCES,
                                                                                min(cfg.data.seq_len, MAX_TOKENS)))
    assert expected.layers == (2,)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = distill(cfg)
    finally:
        torch.set_num_threads(threads)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    final = json.loads((result.export / "config.json").read_text())
    assert final["replaced_layers"]["layers"] == [2]
    sel = final["replaced_layers"]["selection"]
    assert sel["placement"] == "cosine" and sel["layers"] == [2] and sel["forward_passes"] == expected.forward_passes
    assert sel["seconds"] >= 0 and sel["scores"] == pytest.approx({str(i): v for i, v in expected.scores.items()},
                                                                  abs=1e-6)


# -- several ranks: rank 0 chooses, every rank gets its layers (or its error) --------------------------------------

def _two_ranks(rank, port, out):
    import torch.distributed as dist

    from rad_ds.selection import choose_for_run

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        config = SimpleNamespace(layer_types=["attention"] * (8 if rank == 0 else 4))  # only rank 0's is read
        cfg = SimpleNamespace(student=SimpleNamespace(placement="even", k=2, report=None, placement_seed=0))
        layers, record = choose_for_run(cfg, config, None)
        cfg.student.placement, cfg.student.report = "rad", str(out / "missing.json")
        try:
            choose_for_run(cfg, config, None)
            error = None
        except (FileNotFoundError, SelectionError) as e:
            error = f"{type(e).__name__}: {e}"
        (out / f"rank{rank}.json").write_text(json.dumps({"layers": layers, "method": record["placement"],
                                                          "error": error}))
    finally:
        dist.destroy_process_group()


def test_rank_zero_chooses_for_every_rank(tmp_path):
    import torch.multiprocessing as mp

    from tests.ports import free_port

    mp.spawn(_two_ranks, args=(free_port(), tmp_path), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["layers"] == r1["layers"] == [0, 4] and r1["method"] == "even"  # rank 0's 8 layers, not rank 1's 4
    assert r0["error"].startswith("FileNotFoundError") and "missing.json" in r0["error"]
    assert r1["error"].startswith("SelectionError") and "failed on rank 0" in r1["error"]
    assert "missing.json" in r1["error"]
