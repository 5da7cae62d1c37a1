"""JAX copies every batch to the device once, with jax.device_put (asynchronous), and nothing
else crosses to the device inside a step: no numpy array handed to a jitted function (an
implicit, synchronous transfer), no second copy. Checked with JAX's transfer guard, which
refuses implicit host-to-device transfers, and by counting device_put's calls. Small networks
stand in for ResNet-50 and DenseNet-121 inside their tasks' own classes, so that compiling
takes seconds; DenseNet-121's task runs on two XLA host devices, splitting its batch."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, framework_python

CHECK = """
import json
from bench.environment import expose_cpu_devices

expose_cpu_devices(2)  # before JAX is imported
import jax
import numpy as np
from flax import nnx
from bench import frameworks
from bench.specs import TASKS, RunOptions

jax_module = frameworks.load("jax")


class SmallNet(nnx.Module):
    def __init__(self, outputs, rngs):
        self.conv = nnx.Conv(3, outputs, (3, 3), rngs=rngs)
        self.norm = jax_module._batch_norm(outputs, None, rngs)

    def __call__(self, x):
        return nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2))


jax_module.Resnet50 = lambda dtype, rngs: SmallNet(4, rngs)
jax_module.DenseNet121 = lambda spec, dtype, rngs: SmallNet(spec.num_classes, rngs)
copies = []
device_put = jax.device_put
jax.device_put = lambda *args, **kwargs: copies.append(1) or device_put(*args, **kwargs)

rng = np.random.default_rng(0)
counted = {}
for task, shape, devices in (("cnn_cifar10", (3, 32, 32), 1), ("gru_imdb", (150,), 1),
                             ("resnet50_inference", (3, 8, 8), 1), ("densenet121_xray", (3, 8, 8), 2)):
    spec = TASKS[task]
    run = RunOptions(device="cpu", devices=devices, seed=0, threads=None, batch_size=2, input_shape=shape,
                     learning_rate=spec.learning_rate)
    jax_module.configure(run)
    model = jax_module.TASKS[task](spec, run)
    if len(shape) == 1:
        x = rng.integers(0, spec.vocabulary, (2 * devices,) + shape, dtype=np.int32)
    else:
        x = rng.random((2 * devices,) + shape[1:] + shape[:1], dtype=np.float32)  # NHWC
    y = (rng.random((len(x), spec.num_classes)) < 0.5).astype(np.float32) if task == "densenet121_xray" \\
        else rng.integers(0, spec.num_classes, len(x), dtype=np.int32)
    steps = 3
    with jax.transfer_guard_host_to_device("disallow"):
        for _ in range(2):  # the first call compiles, the second runs what was compiled
            copies.clear()
            for _ in range(steps):
                if hasattr(model, "train_step"):
                    model.train_step(x, y)
                model.predict(x)
            counted[task] = len(copies) / steps
    if hasattr(model, "train_step"):
        model.loss()
print(json.dumps(counted))
"""


@pytest.mark.integration
def test_every_batch_goes_to_the_device_once_through_device_put():
    python = framework_python("jax")
    done = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    # A training step copies its inputs and its labels; a prediction its inputs.
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "cnn_cifar10": 3, "gru_imdb": 3, "resnet50_inference": 1, "densenet121_xray": 3}
