"""Tests for msflow.export: the ONNX graph matches MSFlow.predict, and bad files give one CheckpointError."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from msflow import ModelConfig, MSFlow, __version__
from msflow.errors import CheckpointError, DataError
from msflow.infer.export import OUTPUT_NAMES, OnnxModel, export_onnx

SIZE = 64


def _images(batch: int, seed: int) -> torch.Tensor:
    """Smooth random images (pure pixel noise saturates random-weight maps, which would test little)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 8, 8, generator=g)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)


def _perturb(model: MSFlow, seed: int = 1, scale: float = 0.02) -> MSFlow:
    """Nudge the trainable flow parameters off their identity-like init so the maps are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _assert_matches(model: MSFlow, runner: OnnxModel, images: torch.Tensor) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        ref = model.predict(images)
    out = runner.predict(images.numpy())
    assert len(out) == 3
    b = images.shape[0]
    shapes = [(b,), (b, SIZE, SIZE), (b, SIZE, SIZE)]
    for name, r, o, shape in zip(OUTPUT_NAMES, ref, out, shapes, strict=True):
        assert isinstance(o, np.ndarray) and o.dtype == np.float32, name
        assert o.shape == tuple(r.shape) == shape, name
        atol = 1e-6 if name == "scores" else 1e-5
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-4, atol=atol, err_msg=name)
    return out


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> tuple[MSFlow, Path]:
    # The paper's score (bounded by 1), so that the saturation checks below mean something; the
    # default logp score is exported in test_rectangular.py.
    config = ModelConfig(backbone="resnet18", pretrained=False, image_size=SIZE, score="official")
    model = _perturb(MSFlow(config))
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "resnet18.onnx")
    return model, path


def test_resnet18_matches_torch_with_dynamic_batch(resnet18: tuple[MSFlow, Path]) -> None:
    model, path = resnet18
    runner = OnnxModel(path)
    assert runner.image_size == SIZE and runner.batch_size is None
    assert "CPUExecutionProvider" in runner.providers
    _assert_matches(model, runner, _images(1, seed=10))
    scores, pixel_map, image_map = _assert_matches(model, runner, _images(3, seed=11))
    assert scores.max() < 0.999 and np.ptp(scores) > 1e-4  # not saturated: the comparison means something
    assert np.ptp(pixel_map) > 0.1 and np.ptp(image_map) > 0.1


def test_lite0_matches_torch_with_standardization(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # pretrained=True: the ImageNet weights ship with pip, no download
    config = ModelConfig(
        backbone="efficientnet_lite0",
        pretrained=True,
        image_size=SIZE,
        num_blocks=(2, 2, 3),
        score="official",
    )
    model = MSFlow(config)
    _perturb(model, seed=2)
    model.fit_standardization([model.extract(torch.rand(4, 3, SIZE, SIZE))])
    std = model.standardizers[2].std
    assert not torch.allclose(std, torch.ones_like(std))
    runner = OnnxModel(export_onnx(model, tmp_path / "lite0.onnx"), threads=1)
    _assert_matches(model, runner, _images(1, seed=20))
    scores, _, _ = _assert_matches(model, runner, torch.rand(3, 3, SIZE, SIZE))
    assert scores.max() < 0.999 and np.ptp(scores) > 1e-4


def test_global_normalization_matches_torch(tmp_path: Path) -> None:
    config = ModelConfig(
        backbone="resnet18", pretrained=False, image_size=SIZE, normalization="global", num_blocks=(1, 2, 2)
    )
    model = _perturb(MSFlow(config), seed=3)
    model.calibrate_global_normalization([model.standardize(model.extract(_images(4, seed=30)))])
    assert bool(model.anomaly.calibrated)
    runner = OnnxModel(export_onnx(model, tmp_path / "global.onnx"))
    assert runner.metadata["normalization"] == "global"
    _assert_matches(model, runner, _images(1, seed=31))
    _, pixel_map, _ = _assert_matches(model, runner, _images(3, seed=32))
    assert pixel_map.min() > 0  # global maps are not re-zeroed per image


def test_file_is_valid_onnx_with_metadata(resnet18: tuple[MSFlow, Path]) -> None:
    model, path = resnet18
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["msflow_version"] == __version__
    assert meta["image_size"] == str(SIZE)
    assert ModelConfig(**json.loads(meta["config"])) == model.config
    (inp,) = proto.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    assert all(o.type.tensor_type.shape.dim[0].dim_param == dims[0].dim_param for o in proto.graph.output)
    assert OnnxModel(path).metadata["config"] == meta["config"]


def test_fixed_batch_export(tmp_path: Path) -> None:
    config = ModelConfig(backbone="resnet18", pretrained=False, image_size=SIZE, num_blocks=(1, 1, 1))
    model = _perturb(MSFlow(config), seed=4)
    runner = OnnxModel(export_onnx(model, tmp_path / "fixed.onnx", batch_size_dynamic=False))
    assert runner.batch_size == 1
    _assert_matches(model, runner, _images(1, seed=40))
    with pytest.raises(DataError, match=r"\(1, 3, 64, 64\)"):
        runner.predict(_images(3, seed=41).numpy())


def test_wrong_input_shape_is_a_data_error(resnet18: tuple[MSFlow, Path]) -> None:
    runner = OnnxModel(resnet18[1])
    for bad in (np.zeros((1, 3, 32, 32)), np.zeros((3, SIZE, SIZE)), np.zeros((1, 1, SIZE, SIZE))):
        with pytest.raises(DataError, match="expects float images of shape"):
            runner.predict(bad)
    with pytest.raises(DataError, match="uint8"):
        runner.predict(np.zeros((1, 3, SIZE, SIZE), dtype=np.uint8))
    # float64 and torch inputs are accepted and converted
    scores, _, _ = runner.predict(_images(2, seed=50).double().numpy())
    assert scores.shape == (2,) and scores.dtype == np.float32
    assert runner.predict(_images(2, seed=50))[0].shape == (2,)


def _one_line_checkpoint_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        OnnxModel(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _one_line_checkpoint_error(tmp_path / "nope.onnx")
    assert "not a file" in _one_line_checkpoint_error(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_file(resnet18: tuple[MSFlow, Path], tmp_path: Path, keep: float) -> None:
    data = resnet18[1].read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    _one_line_checkpoint_error(cut)


def test_tampered_weights(resnet18: tuple[MSFlow, Path], tmp_path: Path) -> None:
    proto = onnx.load(str(resnet18[1]))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(proto, str(bad))
    assert "checksum" in _one_line_checkpoint_error(bad)


def test_tampered_metadata(resnet18: tuple[MSFlow, Path], tmp_path: Path) -> None:
    proto = onnx.load(str(resnet18[1]))
    for p in proto.metadata_props:
        if p.key == "image_size":
            p.value = "128"
    bad = tmp_path / "tampered_meta.onnx"
    onnx.save(proto, str(bad))
    assert "checksum" in _one_line_checkpoint_error(bad)


def test_foreign_onnx_and_garbage(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    assert "not an msflow" in _one_line_checkpoint_error(foreign)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    _one_line_checkpoint_error(garbage)


def test_export_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = MSFlow(ModelConfig(backbone="resnet18", pretrained=False, image_size=SIZE, num_blocks=(1, 1, 1)))
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def fail(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)  # fails after the temporary file was written
    with pytest.raises(OSError, match="disk full"):
        export_onnx(model, target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.onnx"]
    monkeypatch.undo()
    assert export_onnx(model, target, metadata={"checkpoint_sha256": "abc123"}) == target
    assert os.listdir(tmp_path) == ["model.onnx"]  # the temporary file was renamed, not left behind
    runner = OnnxModel(target)
    assert runner.image_size == SIZE and runner.metadata["checkpoint_sha256"] == "abc123"
    with pytest.raises(ValueError, match="reserved"):
        export_onnx(model, tmp_path / "other.onnx", metadata={"image_size": "128"})


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MSFLOW_SLOW_TESTS"), reason="~20 s and a 220 MB file; set MSFLOW_SLOW_TESTS=1"
)
def test_wide_resnet50_2_exports(tmp_path: Path) -> None:
    """The paper's backbone (random weights, one block per scale to keep the file ~220 MB)."""
    config = ModelConfig(backbone="wide_resnet50_2", pretrained=False, image_size=SIZE, num_blocks=(1, 1, 1))
    model = _perturb(MSFlow(config), seed=5)
    runner = OnnxModel(export_onnx(model, tmp_path / "wrn.onnx"))
    _assert_matches(model, runner, _images(2, seed=60))
