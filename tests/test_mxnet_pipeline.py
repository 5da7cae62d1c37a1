"""MXNet's data path, run in its own environment: the X-ray pipeline resizes with Pillow's
antialiased bilinear filter, as the other frameworks' pipelines do, and numpy batches bound for
a GPU go through page-locked memory, from which MXNet's engine copies them asynchronously."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, framework_python

pytestmark = pytest.mark.integration

STORED_SIZE = 264


def run_in_mxnet(script: str, *args: str) -> str:
    python = framework_python("mxnet")
    done = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# The pipeline's test-time images (a centre crop of the whole stored size: the resized image
# itself, CHW in [0, 1]) and, for comparison, OpenCV's bilinear resize of the same files.
RESIZE = """
import sys
import numpy as np
import mxnet as mx
from bench.data import ImageFiles
from bench.frameworks.mxnet import XrayImages

out, size, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
files = ImageFiles(paths, np.zeros((len(paths), 14), dtype=np.float32))
dataset = XrayImages(files, size, size, training=False, seed=0)
pipeline = [dataset[index][0].asnumpy() for index in range(len(paths))]
opencv = [mx.image.imresize(mx.image.imread(path, flag=1), size, size, interp=1).asnumpy() for path in paths]
np.savez(out, pipeline=np.stack(pipeline), opencv=np.stack(opencv))
"""


def write_images(folder: Path) -> list[Path]:
    """Fine stripes and noise, which a resize without antialiasing turns into moiré: shrunk
    (RGB, grayscale and RGBA files, as ChestX-ray14 has, at a non-integer factor) and enlarged."""
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:1000, 0:900]
    pattern = 127.5 + 100 * np.sin(columns * 1.3) * np.cos(rows * 0.7) + rng.normal(0, 20, (1000, 900))
    rgb = np.clip(np.stack([pattern, pattern[::-1], pattern[:, ::-1]], axis=-1), 0, 255).astype(np.uint8)
    images = {"rgb.png": Image.fromarray(rgb), "gray.png": Image.fromarray(rgb[..., 0]),
              "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])),
              "small.png": Image.fromarray(rgb[:200, :180])}
    for name, image in images.items():
        image.save(folder / name)
    return [folder / name for name in images]


def pillow_resized(path: Path) -> np.ndarray:
    """What the PyTorch, JAX, Chainer and Keras pipelines make of the file, CHW in [0, 1]."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((STORED_SIZE, STORED_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255


def test_the_xray_pipeline_resizes_as_pillows_antialiased_bilinear_filter(tmp_path):
    paths = write_images(tmp_path)
    out = tmp_path / "resized.npz"
    run_in_mxnet(RESIZE, str(out), str(STORED_SIZE), *map(str, paths))
    with np.load(out) as resized:
        pipeline, opencv = resized["pipeline"], resized["opencv"]
    for path, mine, theirs in zip(paths, pipeline, opencv):
        expected = pillow_resized(path)
        levels = np.abs(mine - expected) * 255
        # Pillow rounds to 8 bits between its two passes, MXNet's pipeline once at the end.
        assert levels.max() < 1.001 and levels.mean() < 0.2, path.name
        if path.name != "small.png":  # OpenCV's filter, not widened when it shrinks, aliases
            assert np.abs(theirs.transpose(2, 0, 1) / 255 - expected).max() * 255 > 50, path.name


PLACEMENT = """
import json
import numpy as np
import mxnet as mx
from bench.frameworks.mxnet import _host, _on

tokens = np.arange(6, dtype=np.int32).reshape(2, 3)
loaded = mx.nd.ones((2, 3))  # a loader's batch
on_cpu = _on(tokens, mx.cpu(0))
print(json.dumps({
    "gpu_host": str(_host(tokens, mx.gpu(1)).context),
    "cpu": [str(on_cpu.context), str(on_cpu.dtype.__name__), on_cpu.asnumpy().tolist()],
    "labels_as_float": str(_on(tokens[0], mx.cpu(0), "float32").dtype.__name__),
    "loader_batch_kept": _host(loaded, mx.gpu(0)) is loaded,
}))
"""


def test_numpy_batches_for_a_gpu_are_staged_in_page_locked_memory_and_cpu_batches_made_in_place():
    # No GPU is needed: a CPU build makes page-locked contexts too (in ordinary memory).
    placed = json.loads(run_in_mxnet(PLACEMENT).strip().splitlines()[-1])
    assert placed["gpu_host"] == "cpu_pinned(1)"
    assert placed["cpu"] == ["cpu(0)", "int32", [[0, 1, 2], [3, 4, 5]]]
    assert placed["labels_as_float"] == "float32"
    assert placed["loader_batch_kept"]
