"""What a result says of Keras's compilation is what Keras did: compile(jit_compile=True)
drops XLA for a model with a layer XLA cannot compile, as Keras on TensorFlow does for a GRU
that runs cuDNN's kernel on a GPU (simulated here on the CPU: the layer is told cuDNN is there);
the model then runs through no compiler. On torch, jit_compile=True is torch.compile."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from bench.specs import FRAMEWORK_SPECS
from conftest import REPO, framework_python

CHECK = """
import json, sys
from bench import frameworks
from bench.specs import TASKS, RunOptions, Unsupported

backend = sys.argv[1]
keras_module = frameworks.load(backend)
import keras.src.backend as keras_backend

keras_backend.cudnn_ok = lambda *args, **kwargs: True  # as where cuDNN's GRU kernel is


def run(task, shape, devices=1):
    return RunOptions(device="cpu", devices=devices, seed=0, threads=None, batch_size=4, input_shape=shape,
                      learning_rate=0.01, compile="compiled")


keras_module.configure(run("densenet121_xray", (3, 32, 32), devices=2))  # TensorFlow: two logical CPU devices
modes = {}
for task, shape in (("gru_imdb", (150,)), ("cnn_cifar10", (3, 32, 32))):
    modes[task] = keras_module.TASKS[task](TASKS[task], run(task, shape)).math_modes()
if backend == "keras-tensorflow":  # the only backend with data parallelism and a step that may not compile
    try:
        keras_module.TASKS["densenet121_xray"](TASKS["densenet121_xray"], run("densenet121_xray", (3, 32, 32), 2))
    except Unsupported as error:
        modes["densenet121_xray"] = str(error)
print(json.dumps(modes))
"""


def _modes(framework: str) -> dict:
    done = subprocess.run([str(framework_python(framework)), "-c", CHECK, framework], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_keras_on_tensorflow_records_that_its_gru_runs_without_xla():
    modes = _modes("keras-tensorflow")
    assert modes["gru_imdb"]["xla"] is False and modes["gru_imdb"]["compiler"] is None
    assert modes["cnn_cifar10"]["xla"] is True
    assert modes["cnn_cifar10"]["compiler"] == FRAMEWORK_SPECS["keras-tensorflow"].compiler
    # XLA cannot compile a step under tf.distribute: the compiled data-parallel cell is skipped, saying why.
    assert modes["densenet121_xray"].startswith("Keras on TensorFlow cannot XLA-compile a step under tf.distribute")


@pytest.mark.integration
def test_keras_on_torch_compiles_with_torch_compile():
    modes = _modes("keras-torch")
    for task in ("gru_imdb", "cnn_cifar10"):
        assert modes[task]["xla"] is False
        assert modes[task]["compiler"] == FRAMEWORK_SPECS["keras-torch"].compiler
