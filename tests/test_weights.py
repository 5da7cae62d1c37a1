"""The canonical ResNet-50 weights file that every framework loads."""
from __future__ import annotations

import numpy as np
import pytest

from bench import weights
from bench.specs import RESNET50_INFERENCE


def test_the_canonical_shapes_are_resnet50_v15_without_convolution_biases():
    shapes = weights.resnet50_shapes()
    trainable = sum(int(np.prod(shape)) for name, shape in shapes.items() if not name.endswith(("running_mean", "running_var")))
    assert trainable == RESNET50_INFERENCE.expected_parameters == 23_508_032
    assert not [name for name in shapes if "conv" in name and name.endswith(".bias")]
    assert shapes["layer2.0.conv2.weight"] == (128, 128, 3, 3) and shapes["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert sum(1 for name in shapes if name.endswith("downsample.0.weight")) == 4


def test_a_weights_file_round_trips(tmp_path):
    shapes = weights.resnet50_shapes()
    saved = weights.random_weights(shapes, seed=1)
    np.savez(tmp_path / "w.npz", **saved)
    loaded = weights.load(str(tmp_path / "w.npz"), shapes)
    assert list(loaded) == list(shapes)
    assert all(loaded[name].dtype == np.float32 and np.array_equal(loaded[name], saved[name]) for name in shapes)
    assert all((loaded[name] > 0).all() for name in shapes if name.endswith("running_var"))


def test_a_wrong_weights_file_names_the_tensor(tmp_path):
    shapes = weights.resnet50_shapes()
    arrays = weights.random_weights(shapes, seed=1)
    arrays["layer3.1.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(ValueError, match=r"layer3.1.conv2.weight has shape \(256, 256, 1, 1\), expected \(256, 256, 3, 3\)"):
        weights.load(str(tmp_path / "shape.npz"), shapes)
    del arrays["conv1.weight"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(ValueError, match="1 tensors are missing, conv1.weight the first; .*torchvision's names"):
        weights.load(str(tmp_path / "missing.npz"), shapes)
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a readable .npz weights file"):
        weights.load(str(tmp_path / "text.npz"), shapes)
