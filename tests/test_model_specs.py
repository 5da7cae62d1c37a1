"""Every framework builds the model the specs describe, not only one with as many parameters.

From bench/specs.py alone this file derives each task's parameter inventory: every trainable
tensor's shape in PyTorch's convention and the initialiser it must start from. Each framework's
environment builds the four task models and hands over its trainable arrays; the test matches
them to the inventory by shape (whatever the framework's layout) and checks each one's values
against its initialiser: zeros, ones, the uniform and normal spreads, orthogonality. A wrong
block layout, growth rate, bottleneck width or GRU size changes the shapes; a framework default
left in place changes the values. The batch norms' momentum and epsilon are read off the
frameworks' own layer objects.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from bench.specs import (BATCH_NORM, CNN, DENSENET121, GLOROT_UNIFORM, GRU, HE_NORMAL, ONES, ORTHOGONAL,
                         RESNET50, TASKS, UNIFORM, ZEROS, Init)
from conftest import REPO, framework_python
from harness.parity import LOCAL_FRAMEWORKS


class Tensor(NamedTuple):
    shape: tuple[int, ...]  # PyTorch's: (out, in, kh, kw), (out, in), (features,)
    init: Init

    @property
    def fans(self) -> tuple[int, int]:
        receptive = math.prod(self.shape[2:])
        return (self.shape[1] * receptive, self.shape[0] * receptive) if len(self.shape) > 1 else (1, 1)


def _batch_norm(channels: int) -> list[Tensor]:
    return [Tensor((channels,), BATCH_NORM.scale_init), Tensor((channels,), BATCH_NORM.shift_init)]


def cnn_inventory(channels: int, size: int, classes: int) -> list[Tensor]:
    tensors = []
    for pair in CNN.filters:
        for filters in pair:
            tensors += [Tensor((filters, channels, CNN.kernel_size, CNN.kernel_size), CNN.kernel_init),
                        Tensor((filters,), CNN.bias_init)]
            channels = filters
        size //= 2
    return tensors + [Tensor((CNN.dense_units, channels * size * size), CNN.kernel_init),
                      Tensor((CNN.dense_units,), CNN.bias_init),
                      Tensor((classes, CNN.dense_units), CNN.kernel_init), Tensor((classes,), CNN.bias_init)]


def gru_inventory(vocabulary: int, classes: int) -> list[Tensor]:
    stacked = GRU.gates * GRU.units
    return [Tensor((vocabulary, GRU.embedding), GRU.embedding_init),
            Tensor((stacked, GRU.embedding), GRU.input_kernel_init),
            Tensor((stacked, GRU.units), GRU.recurrent_kernel_init),
            Tensor((stacked,), GRU.bias_init), Tensor((stacked,), GRU.bias_init),
            Tensor((classes, GRU.units), GRU.dense_kernel_init), Tensor((classes,), GRU.dense_bias_init)]


def resnet50_inventory() -> list[Tensor]:
    def conv(out: int, inp: int, kernel: int) -> Tensor:
        return Tensor((out, inp, kernel, kernel), RESNET50.conv_init)

    tensors = [conv(RESNET50.stem, 3, 7)] + _batch_norm(RESNET50.stem)
    channels = RESNET50.stem
    for width, blocks in RESNET50.stages:
        out = width * RESNET50.expansion
        for block in range(blocks):
            tensors += [conv(width, channels, 1), *_batch_norm(width), conv(width, width, 3), *_batch_norm(width),
                        conv(out, width, 1), *_batch_norm(out)]
            if block == 0:
                tensors += [conv(out, channels, 1), *_batch_norm(out)]
            channels = out
    return tensors


def densenet121_inventory(classes: int) -> list[Tensor]:
    def conv(out: int, inp: int, kernel: int) -> Tensor:
        return Tensor((out, inp, kernel, kernel), DENSENET121.conv_init)

    tensors = [conv(DENSENET121.stem, 3, 7)] + _batch_norm(DENSENET121.stem)
    channels, width = DENSENET121.stem, DENSENET121.bottleneck_width
    for index, layers in enumerate(DENSENET121.blocks):
        for _ in range(layers):
            tensors += [*_batch_norm(channels), conv(width, channels, 1), *_batch_norm(width),
                        conv(DENSENET121.growth, width, 3)]
            channels += DENSENET121.growth
        if index < len(DENSENET121.blocks) - 1:
            out = int(channels * DENSENET121.compression)
            tensors += [*_batch_norm(channels), conv(out, channels, 1)]
            channels = out
    return tensors + _batch_norm(channels) + [Tensor((classes, channels), DENSENET121.dense_kernel_init),
                                              Tensor((classes,), DENSENET121.dense_bias_init)]


# The CNN's dense layer depends on the image size; the other networks' parameters do not.
SMALL_IMAGE = (3, 32, 32)
INVENTORIES = {
    "cnn_cifar10": cnn_inventory(*TASKS["cnn_cifar10"].input_shape[:2], TASKS["cnn_cifar10"].num_classes),
    "resnet50_inference": resnet50_inventory(),
    "gru_imdb": gru_inventory(TASKS["gru_imdb"].vocabulary, TASKS["gru_imdb"].num_classes),
    "densenet121_xray": densenet121_inventory(TASKS["densenet121_xray"].num_classes),
}


@pytest.mark.parametrize("task", sorted(INVENTORIES))
def test_the_inventory_holds_the_tasks_parameter_count(task):
    assert sum(math.prod(t.shape) for t in INVENTORIES[task]) == TASKS[task].expected_parameters


def fits(values: np.ndarray, tensor: Tensor) -> bool:
    """Whether ``values`` could have been drawn by the tensor's initialiser: a test that a
    right draw fails with a probability far below one in a million."""
    init, values = tensor.init, np.asarray(values, dtype=np.float64)
    if init.kind == ZEROS:
        return bool(np.all(values == 0))
    if init.kind == ONES:
        return bool(np.all(values == 1))
    if init.kind == ORTHOGONAL:
        matrix = values.reshape(values.shape[0], -1)
        gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
        return bool(np.allclose(gram, np.eye(len(gram)), atol=1e-4))
    n, expected = values.size, init.std(*tensor.fans)
    std = values.std()
    if abs(values.mean()) > 6 * expected / math.sqrt(n):
        return False
    if init.kind in (UNIFORM, GLOROT_UNIFORM):
        # A uniform draw stays within ±sqrt(3) std; its sample std varies by 0.45 / sqrt(n).
        limit = expected * math.sqrt(3)
        return bool(np.abs(values).max() <= limit * (1 + 1e-5)
                    and abs(std / expected - 1) < max(0.02, 6 * 0.45 / math.sqrt(n)))
    assert init.kind == HE_NORMAL, init
    # A normal draw's sample std varies by 0.71 / sqrt(n); an untruncated one of 2,000 values
    # almost surely has one beyond 2.6 std (Keras's truncated normal stops near 2.3).
    return bool(abs(std / expected - 1) < max(0.02, 6 * 0.71 / math.sqrt(n))
                and (n < 2000 or np.abs(values).max() > 2.6 * expected))


def mismatches(found: list[np.ndarray], inventory: list[Tensor]) -> list[str]:
    """What keeps ``found`` from being the inventory: shapes (compared as sorted dimensions, so
    that any layout matches) in the wrong numbers, or arrays no expected tensor of their shape
    could start as; empty when each array matches its own expected tensor."""
    def key(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(shape))

    expected_shapes, found_shapes = Counter(key(t.shape) for t in inventory), Counter(key(a.shape) for a in found)
    if expected_shapes != found_shapes:
        missing, extra = expected_shapes - found_shapes, found_shapes - expected_shapes
        return [f"shapes missing {dict(missing)}, unexpected {dict(extra)}"]
    problems = []
    by_shape: dict[tuple[int, ...], list[Tensor]] = defaultdict(list)
    for tensor in inventory:
        by_shape[key(tensor.shape)].append(tensor)
    arrays: dict[tuple[int, ...], list[np.ndarray]] = defaultdict(list)
    for array in found:
        arrays[key(array.shape)].append(array)
    for shape, tensors in by_shape.items():
        # Each array to a distinct tensor it fits (augmenting paths: shapes repeat, initialisers vary).
        candidates = [[i for i, tensor in enumerate(tensors) if fits(array, tensor)] for array in arrays[shape]]
        owner: dict[int, int] = {}

        def assign(index: int, seen: set[int]) -> bool:
            for tensor in candidates[index]:
                if tensor not in seen:
                    seen.add(tensor)
                    if tensor not in owner or assign(owner[tensor], seen):
                        owner[tensor] = index
                        return True
            return False

        unmatched = [index for index in range(len(candidates)) if not assign(index, set())]
        for index in unmatched:
            array = arrays[shape][index]
            problems.append(f"an array of shape {array.shape} (mean {array.mean():.3g}, std {array.std():.3g}, "
                            f"max |x| {np.abs(array).max():.3g}) fits none of "
                            f"{sorted({(t.shape, t.init.kind, t.init.fan) for t in tensors})}")
    return problems


def test_mismatches_finds_a_default_initialiser_and_a_wrong_width():
    rng = np.random.default_rng(0)
    inventory = [Tensor((64, 32, 3, 3), Init(HE_NORMAL)), Tensor((64,), Init(ZEROS)), Tensor((64,), Init(ONES))]
    right = [rng.normal(0, math.sqrt(2 / 288), (3, 3, 32, 64)), np.ones(64), np.zeros(64)]
    assert mismatches(right, inventory) == []
    # PyTorch's default (Kaiming uniform, a = sqrt 5) instead of He normal:
    default = rng.uniform(-1 / math.sqrt(288), 1 / math.sqrt(288), (64, 32, 3, 3))
    assert "fits none" in mismatches([default, *right[1:]], inventory)[0]
    # A truncated normal (Keras's he_normal) of the right spread:
    truncated = rng.normal(0, 1, 20000)
    truncated = truncated[np.abs(truncated) < 2][:18432].reshape(64, 32, 3, 3) * math.sqrt(2 / 288) / 0.8796
    assert mismatches([truncated, *right[1:]], inventory)
    assert "shapes missing" in mismatches([rng.normal(0, 0.1, (48, 32, 3, 3)), *right[1:]], inventory)[0]
    # Orthogonal recurrent kernels pass in either orientation; a Glorot one does not.
    q, _ = np.linalg.qr(rng.normal(size=(300, 100)))
    orthogonal = [Tensor((300, 100), Init(ORTHOGONAL))]
    assert mismatches([q], orthogonal) == mismatches([q.T], orthogonal) == []
    assert mismatches([rng.uniform(-0.12, 0.12, (300, 100))], orthogonal)


# Builds the four task models in the framework's environment on the CPU and saves each one's
# trainable arrays (the GRU's as PyTorch stacks its gates) and its batch norms' PyTorch-convention
# momentum and epsilon, read off the framework's own layer objects.
BUILD_AND_SAVE = """
import json, sys
import numpy as np
from bench import frameworks
from bench.specs import TASKS, RunOptions

name, out = sys.argv[1], sys.argv[2]
module = frameworks.load(name)


def build(task, input_shape):
    spec = TASKS[task]
    run = RunOptions(device="cpu", devices=1, seed=0, threads=None, batch_size=2, input_shape=input_shape,
                     learning_rate=spec.learning_rate)
    return module.TASKS[task](spec, run)


def model_of(task):
    for attribute in ("model", "net"):
        if hasattr(task, attribute):
            return getattr(task, attribute)
    return task.rank0.model


def trainable(model):
    if name == "pytorch":
        return [p.detach().numpy() for p in model.parameters() if p.requires_grad]
    if name == "tensorflow" or name.startswith("keras"):
        import keras
        return [keras.ops.convert_to_numpy(v.value if hasattr(v, "value") else v) for v in model.trainable_weights]
    if name == "jax":
        import jax
        from flax import nnx
        return [np.asarray(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param))]
    if name == "mxnet":
        return [p.data().asnumpy() for p in model.collect_params().values() if p.grad_req != "null"]
    if name == "chainer":
        return [p.array for p in model.params()]
    raise ValueError(name)


def gru_as_pytorch(arrays):
    if name == "chainer":  # NStepGRU: one matrix and one bias per gate, input side (0-2) then recurrent (3-5)
        model = model_of(gru)
        w, b = [model.gru.ws[0][i].array for i in range(6)], [model.gru.bs[0][i].array for i in range(6)]
        rest = [p.array for path, p in sorted(model.namedparams()) if not path.startswith("/gru/")]
        return [np.concatenate(w[:3]), np.concatenate(w[3:]), np.concatenate(b[:3]), np.concatenate(b[3:])] + rest
    # Keras keeps both bias vectors of reset_after as one (2, 3 × units) weight.
    return [row for array in arrays for row in (array if array.ndim == 2 and array.shape[0] == 2
                                                 and array.shape[1] % 3 == 0 else [array])]


def batch_norms(model):
    found = []
    if name == "pytorch":
        import torch
        found = [(m.momentum, m.eps) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    elif name == "tensorflow" or name.startswith("keras"):
        import keras
        layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
        found = [(1 - layer.momentum, layer.epsilon) for layer in layers]
    elif name == "jax":
        from flax import nnx
        found = [(1 - m.momentum, m.epsilon) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    elif name == "mxnet":
        from mxnet.gluon import nn
        def walk(block):
            if isinstance(block, nn.BatchNorm):
                found.append((1 - block._kwargs["momentum"], block._kwargs["eps"]))
            for child in block._children.values():
                walk(child)
        walk(model)
    elif name == "chainer":
        import chainer.links as L
        found = [(1 - link.decay, link.eps) for link in model.links() if isinstance(link, L.BatchNormalization)]
    return found


arrays, norms = {}, {}
for task, shape in (("cnn_cifar10", TASKS["cnn_cifar10"].input_shape), ("resnet50_inference", (3, 32, 32)),
                    ("gru_imdb", TASKS["gru_imdb"].input_shape), ("densenet121_xray", (3, 32, 32))):
    built = build(task, shape)
    model = model_of(built)
    found = trainable(model)
    if task == "gru_imdb":
        gru = built
        found = gru_as_pytorch(found)
    if task in ("resnet50_inference", "densenet121_xray"):
        norms[task] = batch_norms(model)
    for index, array in enumerate(found):
        arrays[f"{task}/{index}"] = np.asarray(array, dtype=np.float32)
np.savez(out, **arrays)
print(json.dumps(norms))
"""


@pytest.fixture(scope="module", params=LOCAL_FRAMEWORKS)
def built_models(request, tmp_path_factory) -> tuple[str, dict[str, list[np.ndarray]], dict[str, list]]:
    """(framework, task -> trainable arrays, task -> batch norms' [momentum, epsilon])."""
    framework = request.param
    python = framework_python(framework)
    out = tmp_path_factory.mktemp(framework) / "parameters.npz"
    done = subprocess.run([str(python), "-c", BUILD_AND_SAVE, framework, str(out)], capture_output=True, text=True,
                          cwd=REPO, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    norms = json.loads(done.stdout.strip().splitlines()[-1])
    arrays: dict[str, list[np.ndarray]] = defaultdict(list)
    with np.load(out) as saved:
        for key in sorted(saved.files, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
            arrays[key.split("/")[0]].append(saved[key])
    Path(out).unlink()
    return framework, arrays, norms


@pytest.mark.integration
@pytest.mark.parametrize("task", sorted(INVENTORIES))
def test_each_framework_builds_the_specified_layers_with_the_specified_initialisers(built_models, task):
    framework, arrays, _ = built_models
    assert mismatches(arrays[task], INVENTORIES[task]) == [], f"{framework} {task}"


@pytest.mark.integration
@pytest.mark.parametrize("task, count", [("resnet50_inference", 53), ("densenet121_xray", 121)])
def test_every_batch_norm_has_the_specified_momentum_and_epsilon(built_models, task, count):
    # ResNet-50: the stem's, three per bottleneck, four projections'. DenseNet-121: two per
    # dense layer (58), the stem's, the three transitions' and the last.
    framework, _, norms = built_models
    assert len(norms[task]) == count, framework
    for momentum, epsilon in norms[task]:
        assert momentum == pytest.approx(BATCH_NORM.momentum) and epsilon == pytest.approx(BATCH_NORM.epsilon)
