"""Generated and user inputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.data import calibration_source, generate_feeds, index_ranges, load_feeds, parse_input_shapes
from graphopt.errors import InputError

EMBED = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[batch, seq] ids, int64[batch, seq] mask, bool[batch] flag, string[2] s, float[batch, 3, H, W] img) => (float[batch, seq, 4] y)
<float[50, 4] table = {%s}> {
    c = Cast<to = 1>(ids)
    y = Gather(table, ids)
}
""" % ",".join(["0.5"] * 200)


def test_generated_feeds_respect_signature_and_tables():
    m = onnx.parser.parse_model(EMBED)
    assert index_ranges(m) == {"ids": (0, 50)}
    (f,) = generate_feeds(m, seed=3)
    assert f["ids"].dtype == np.int64 and f["ids"].shape == (1, 64)
    assert f["ids"].min() >= 0 and f["ids"].max() < 50
    assert f["mask"].shape == f["ids"].shape  # the same symbol gets the same value
    assert f["flag"].dtype == bool and f["s"].dtype == object
    assert f["img"].shape == (1, 3, 64, 64) and f["img"].dtype == np.float32
    (g,) = generate_feeds(m, seed=3)
    np.testing.assert_array_equal(f["img"], g["img"])  # fixed seed


def test_input_shape_overrides():
    m = onnx.parser.parse_model(EMBED)
    shapes = parse_input_shapes(["img:2x3x32x16", "ids:2,7"])
    (f,) = generate_feeds(m, input_shapes=shapes)
    assert f["img"].shape == (2, 3, 32, 16) and f["ids"].shape == (2, 7) and f["mask"].shape == (2, 7)
    with pytest.raises(InputError, match="conflicts"):
        generate_feeds(m, input_shapes={"img": [1, 4, 8, 8]})
    with pytest.raises(InputError, match="names no model input"):
        generate_feeds(m, input_shapes={"nope": [1]})
    with pytest.raises(InputError):
        parse_input_shapes(["img=1x2"])


def test_load_feeds_npz_and_pb(tmp_path, fixtures_dir):
    m = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    f = load_feeds(fixtures_dir / "tiny_cnn_inputs.npz", m)
    assert list(f) == ["input"]
    t = onnx.numpy_helper.from_array(f["input"])
    (tmp_path / "x.pb").write_bytes(t.SerializeToString())
    g = load_feeds(tmp_path / "x.pb", m)
    np.testing.assert_array_equal(g["input"], f["input"])


def test_calibration_batches(fixtures_dir):
    m = onnx.load(fixtures_dir / "tiny_cnn.onnx")
    src = calibration_source(fixtures_dir / "tiny_cnn_calib.npz", m, batch_size=8)
    batches = list(src())
    assert [b["input"].shape[0] for b in batches] == [8, 8, 8, 8]
    assert len(list(src())) == 4  # re-iterable
    with pytest.raises(InputError, match="no such calibration file"):
        calibration_source("/nonexistent.npz", m)
