"""TensorFlow's image pipeline resizes as Pillow's bilinear filter does, the filter of the PyTorch,
JAX, Chainer and Keras pipelines: antialiased when shrinking, plain bilinear when enlarging.

Pillow is not in TensorFlow's environment: the pipeline runs there, Pillow here, on the same
PNG files."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, framework_python, write_png

pytestmark = pytest.mark.integration

STORED_SIZE = 32

# The test pipeline (no augmentation) of a DenseNet-121 whose input is the stored size: its
# centre crop keeps the whole resized image.
RESIZE_IN_TENSORFLOW = """
import sys
import numpy as np
from bench import frameworks
from bench.data import ImageFiles
from bench.specs import TASKS, RunOptions

out, size, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
task = TASKS["densenet121_xray"]
run = RunOptions(device="cpu", devices=1, seed=0, threads=None, batch_size=len(paths), input_shape=(3, size, size),
                 learning_rate=task.learning_rate)
model = frameworks.load("tensorflow").TASKS["densenet121_xray"](task, run)
files = ImageFiles(paths, np.zeros((len(paths), task.num_classes), np.float32))
(images, _), = model.input_pipeline(files, size, len(paths), False, 0)
np.save(out, images.numpy())
"""


def pillow_resized(path, size: int) -> np.ndarray:
    """As the other frameworks' pipelines read a file: RGB, bilinear, scaled to [0, 1]."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255


def test_tensorflow_resizes_as_pillows_bilinear_filter(tmp_path):
    rng = np.random.default_rng(0)
    # Smooth content with noise, as X-rays are; one shrunk 3x (where antialiasing matters),
    # one RGBA shrunk by a fraction, one enlarged.
    rows, columns = np.mgrid[0:96, 0:96]
    smooth = 127 + 100 * np.sin(rows / 9) * np.cos(columns / 13)
    grey = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255)
    rgba = np.dstack([grey[:45, :45], smooth[:45, :45], grey[:45, :45][::-1], np.full((45, 45), 255)])
    small = rng.integers(0, 256, (20, 20))
    paths = [write_png(tmp_path / "shrunk.png", grey), write_png(tmp_path / "rgba.png", rgba),
             write_png(tmp_path / "enlarged.png", small)]

    python = framework_python("tensorflow")
    out = tmp_path / "tensorflow.npy"
    done = subprocess.run([str(python), "-c", RESIZE_IN_TENSORFLOW, str(out), str(STORED_SIZE), *map(str, paths)],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]

    for path, resized in zip(paths, np.load(out)):
        expected = pillow_resized(path, STORED_SIZE)
        difference = np.abs(resized - expected) * 255  # in 8-bit levels
        # Pillow rounds its output to 8 bits: within one level (without antialiasing the 3x
        # shrink is off by up to 62).
        assert difference.max() <= 1.001 and difference.mean() < 0.4, path.name
