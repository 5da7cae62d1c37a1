"""Every framework builds the model the specs describe, not only one with as many parameters:
each batch norm of DenseNet-121 has the task's momentum and epsilon (bench/specs.py BATCH_NORM),
read back from the framework's own layers in its environment."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from bench.specs import BATCH_NORM
from conftest import REPO
from harness.backends.local import VirtualenvBackend
from harness.parity import LOCAL_FRAMEWORKS

# Builds the framework's DenseNet-121 task and prints [PyTorch-convention momentum, epsilon]
# of each of its batch norms, read off the framework's own layer objects.
BATCH_NORMS = """
import json, sys
from bench import frameworks
from bench.specs import TASKS, RunOptions

name = sys.argv[1]
module = frameworks.load(name)
run = RunOptions(device="cpu", devices=1, seed=0, threads=None, batch_size=2, input_shape=(3, 32, 32),
                 learning_rate=1e-4)
task = module.TASKS["densenet121_xray"](TASKS["densenet121_xray"], run)
found = []
if name == "pytorch":
    import torch
    found = [(m.momentum, m.eps) for m in task.rank0.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
elif name == "tensorflow" or name.startswith("keras"):
    import keras
    layers = [layer for layer in task.model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    found = [(1 - layer.momentum, layer.epsilon) for layer in layers]
elif name == "jax":
    from flax import nnx
    found = [(1 - m.momentum, m.epsilon) for _, m in nnx.iter_graph(task.model) if isinstance(m, nnx.BatchNorm)]
elif name == "mxnet":
    from mxnet.gluon import nn
    def walk(block):
        if isinstance(block, nn.BatchNorm):
            found.append((1 - block._kwargs["momentum"], block._kwargs["eps"]))
        for child in block._children.values():
            walk(child)
    walk(task.net)
elif name == "chainer":
    import chainer.links as L
    found = [(1 - link.decay, link.eps) for link in task.model.links() if isinstance(link, L.BatchNormalization)]
print(json.dumps(found))
"""


@pytest.mark.integration
@pytest.mark.parametrize("framework", LOCAL_FRAMEWORKS)
def test_every_batch_norm_of_densenet121_has_the_tasks_momentum_and_epsilon(framework):
    backend = VirtualenvBackend()
    backend.prepare_environment(framework, "cpu")
    python = backend.environment_path(framework, "cpu") / "bin" / "python"
    done = subprocess.run([str(python), "-c", BATCH_NORMS, framework], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) == 121  # DenseNet-121: one before each of its 58 dense layers' two convolutions,
    # the stem's, the three transitions' and the last
    for momentum, epsilon in found:
        assert momentum == pytest.approx(BATCH_NORM.momentum) and epsilon == pytest.approx(BATCH_NORM.epsilon)
