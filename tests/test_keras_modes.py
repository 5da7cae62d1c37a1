"""What a result says of Keras's compilation is what Keras did: compile(jit_compile=True)
drops XLA for a model with a layer XLA cannot compile, as Keras on TensorFlow does for a GRU
that runs cuDNN's kernel on a GPU (simulated here on the CPU: the layer is told cuDNN is there)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, framework_python

CHECK = """
import json
from bench import frameworks
from bench.specs import TASKS, RunOptions

keras_module = frameworks.load("keras-tensorflow")
import keras.src.backend as keras_backend

keras_backend.cudnn_ok = lambda *args, **kwargs: True  # as where cuDNN's GRU kernel is
keras_module._jit_compile = lambda run: True  # what the bench asks for on one GPU
modes = {}
for task, shape in (("gru_imdb", (150,)), ("cnn_cifar10", (3, 32, 32))):
    run = RunOptions(device="cpu", devices=1, seed=0, threads=None, batch_size=4, input_shape=shape,
                     learning_rate=0.01)
    modes[task] = keras_module.TASKS[task](TASKS[task], run).math_modes()
print(json.dumps(modes))
"""


@pytest.mark.integration
def test_keras_on_tensorflow_records_that_its_gru_runs_without_xla():
    python = framework_python("keras-tensorflow")
    done = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    modes = json.loads(done.stdout.strip().splitlines()[-1])
    assert modes["gru_imdb"]["xla"] is False and modes["cnn_cifar10"]["xla"] is True
