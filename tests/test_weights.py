"""Tensor-by-tensor safetensors I/O (``rad_ds.models.weights``) against the safetensors library itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rad_ds.models.weights import SafetensorsWriter, WeightSource, WeightSourceError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "c": torch.arange(4), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
            "strided": torch.randn(4, 6, generator=g).t(), "half": torch.randn(2, 2, generator=g).half()}


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    ts = _tensors()
    with SafetensorsWriter(tmp_path / "model.safetensors", [(k, v.shape, v.dtype) for k, v in ts.items()],
                           metadata={"format": "pt"}) as w:
        for k, v in ts.items():
            w.write(k, v)
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == ts.keys() and all(torch.equal(back[k], ts[k]) for k in ts)
    with pytest.raises(ValueError, match="expected tensor a next"):
        with SafetensorsWriter(tmp_path / "x.safetensors", [("a", (3, 5), torch.float32)]) as w:
            w.write("b", ts["a"])
    with pytest.raises(ValueError, match="1 tensor\\(s\\) not written, first a"):
        with SafetensorsWriter(tmp_path / "y.safetensors", [("a", (3, 5), torch.float32)]):
            pass


def test_source_of_a_sharded_directory_reads_rows_shapes_and_dtypes(tmp_path):
    ts = _tensors()
    names = list(ts)
    shards = {"s1.safetensors": names[:3], "s2.safetensors": names[3:]}
    for f, keys in shards.items():
        save_file({k: ts[k].contiguous() for k in keys}, tmp_path / f)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    src = WeightSource(tmp_path)
    assert sorted(src.names()) == sorted(names) and "a" in src and "zz" not in src
    for k, v in ts.items():
        assert src.shape(k) == list(v.shape) and src.dtype(k) == v.dtype
        assert torch.equal(src.read(k), v)
    assert torch.equal(src.rows("a", 1, 3), ts["a"][1:3]) and torch.equal(src.rows("scalar", 0, 1), ts["scalar"])
    with pytest.raises(WeightSourceError, match="no tensor 'zz'"):
        src.read("zz")
    assert WeightSource.find(tmp_path / "nothing") is None
