"""The compile profiles (specs.COMPILE_PROFILES) in the framework modules: each records the
compiler its models run through, and a compiled model does the default's work, through its
framework's compiler: the same outputs and losses from the same weights and batches. Small
networks stand in for the tasks' networks inside the tasks' own classes, so that compiling
takes seconds."""
from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.specs import FRAMEWORK_SPECS
from conftest import REPO, framework_python
from harness.parity import LOCAL_FRAMEWORKS


def _run(framework: str, script: str, folder: Path, *args: str) -> dict:
    """The last line of ``script``'s output (JSON), run as a file in ``folder`` in the framework's
    environment: processes it spawns (PyTorch's ranks) run its top level too."""
    path = folder / "check.py"
    path.write_text(script)
    done = subprocess.run([str(framework_python(framework)), str(path), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_framework_module_records_the_compiler():
    for module in sorted({name.split("-")[0] for name in FRAMEWORK_SPECS}):
        tree = ast.parse((REPO / "bench" / "frameworks" / f"{module}.py").read_text())
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and ast.unparse(node.func) == "precision.math_modes"]
        assert len(calls) == 1 and "compiler" in {keyword.arg for keyword in calls[0].keywords}, module


DESCRIBE = """
import dataclasses, json, sys
from bench import frameworks
from bench.specs import COMPILE_PROFILES, RunOptions

module = frameworks.load(sys.argv[1])
run = RunOptions(device="cpu", devices=1, seed=0, threads=None, batch_size=1, input_shape=(3, 32, 32),
                 learning_rate=0.0)
module.configure(run)
modes = {profile: module.describe(dataclasses.replace(run, compile=profile))["math_modes"]
         for profile in COMPILE_PROFILES}
print(json.dumps(modes))
"""


@pytest.mark.integration
@pytest.mark.parametrize("framework", LOCAL_FRAMEWORKS)
def test_describe_records_the_compiler_of_each_profile(framework, tmp_path):
    """The framework's compiler in the compiled profile, and by default where the default
    compiles (on a CPU: Keras compiles on TensorFlow only on GPUs); Chainer has none."""
    spec = FRAMEWORK_SPECS[framework]
    modes = _run(framework, DESCRIBE, tmp_path, framework)
    assert modes["default"]["compiler"] == (spec.compiler if spec.compiles_by_default else None)
    assert modes["compiled"]["compiler"] == spec.compiler
    if framework in ("tensorflow", "keras-tensorflow"):
        assert (modes["default"]["xla"], modes["compiled"]["xla"]) == (False, True)


PYTORCH = """
import json
import numpy as np
import torch
from torch import nn
from bench.frameworks import pytorch
from bench.shards import global_batches
from bench.specs import TASKS, RunOptions


class SmallNet(nn.Sequential):
    def __init__(self, outputs):
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, outputs))


# At the top level: DenseNet's spawned ranks run this file too.
pytorch.CnnCifar10Net = lambda spec: SmallNet(spec.num_classes)
pytorch.Resnet50 = lambda spec: SmallNet(8)
pytorch.DenseNet121 = lambda spec: SmallNet(spec.num_classes)

if __name__ == "__main__":
    rng = np.random.default_rng(0)
    images = rng.random((8, 32, 32, 3), dtype=np.float32)  # NHWC, the CPU layout
    classes = rng.integers(0, 10, 8)
    findings = (rng.random((8, 14)) < 0.5).astype(np.float32)
    out = {}
    for profile in ("default", "compiled"):
        def run(task, devices=1):
            return RunOptions(device="cpu", devices=devices, seed=0, threads=None, batch_size=4,
                              input_shape=(3, 32, 32), learning_rate=TASKS[task].learning_rate, compile=profile)
        cnn = pytorch.CnnCifar10(TASKS["cnn_cifar10"], run("cnn_cifar10"))
        losses = []
        for step in range(2):
            cnn.train_step(images[4 * step:4 * step + 4], classes[4 * step:4 * step + 4])
            losses.append(cnn.loss())
        resnet = pytorch.Resnet50Inference(TASKS["resnet50_inference"], run("resnet50_inference"))
        # Two ranks, each compiling its DistributedDataParallel replica.
        densenet = pytorch.Densenet121Xray(TASKS["densenet121_xray"], run("densenet121_xray", devices=2))
        parallel = []
        for batch, _ in list(densenet.array_batches(images, findings, 4, None)):
            densenet.train_step(batch, None)
            parallel.append(densenet.loss())
        out[profile] = {
            "cnn": losses + np.ravel(cnn.predict(images)).tolist(), "resnet": np.ravel(resnet.predict(images)).tolist(),
            "densenet": parallel + np.ravel(densenet.predict(images)).tolist(),
            "modules": [type(module).__name__ for module in (cnn.model, resnet.model, densenet.rank0.model,
                                                             densenet.rank0.replica)],
            "replica_wraps": type(getattr(densenet.rank0.replica, "_orig_mod", densenet.rank0.replica)).__name__,
        }
        densenet.close()
    print(json.dumps(out))
"""


@pytest.mark.integration
def test_pytorch_compiled_models_do_the_eager_models_work(tmp_path):
    """torch.compile'd CNN training, ResNet inference and DenseNet training on two ranks (DDP
    compiled once wrapped, as PyTorch's notes ask) give the eager models' losses and outputs."""
    out = _run("pytorch", PYTORCH, tmp_path)
    assert out["default"]["modules"] == ["SmallNet", "SmallNet", "SmallNet", "DistributedDataParallel"]
    assert out["compiled"]["modules"] == ["OptimizedModule"] * 4
    assert out["compiled"]["replica_wraps"] == "DistributedDataParallel"
    for task in ("cnn", "resnet", "densenet"):
        assert out["compiled"][task] == pytest.approx(out["default"][task], rel=1e-4, abs=1e-5), task


TENSORFLOW = """
import json
import numpy as np
import tensorflow as tf
from bench.frameworks import tensorflow as module
from bench.specs import TASKS, RunOptions


def small_net(input_shape, outputs):
    return tf.keras.Sequential([tf.keras.Input(input_shape), tf.keras.layers.Conv2D(4, 3, padding="same"),
                                tf.keras.layers.BatchNormalization(), tf.keras.layers.ReLU(),
                                tf.keras.layers.GlobalAveragePooling2D(), tf.keras.layers.Dense(outputs)])


module.build_cnn_cifar10 = lambda spec, data_format: small_net((32, 32, 3), spec.num_classes)
module.build_resnet50 = lambda input_shape, data_format: small_net(input_shape, 8)
module.build_densenet121 = lambda spec, input_shape: small_net(input_shape, spec.num_classes)
rng = np.random.default_rng(0)
images = rng.random((8, 32, 32, 3), dtype=np.float32)
classes = rng.integers(0, 10, 8).astype(np.int32)
findings = (rng.random((8, 14)) < 0.5).astype(np.float32)
module.configure(RunOptions(device="cpu", devices=2, seed=0, threads=None, batch_size=4, input_shape=(3, 32, 32),
                            learning_rate=0.0))  # once, before TensorFlow starts: two logical CPU devices
out = {}
for profile in ("default", "compiled"):
    def run(task, devices=1):
        return RunOptions(device="cpu", devices=devices, seed=0, threads=None, batch_size=4, input_shape=(3, 32, 32),
                          learning_rate=TASKS[task].learning_rate, compile=profile)
    cnn = module.CnnCifar10(TASKS["cnn_cifar10"], run("cnn_cifar10"))
    losses = []
    for step in range(2):
        cnn.train_step(images[4 * step:4 * step + 4], classes[4 * step:4 * step + 4])
        losses.append(cnn.loss())
    try:  # TensorFlow's own test of a jit-compiled function: only those have XLA's IR
        cnn._predict.experimental_get_compiler_ir(images)(stage="hlo")
        xla = True
    except ValueError:
        xla = False
    resnet = module.Resnet50Inference(TASKS["resnet50_inference"], run("resnet50_inference"))
    parallel = []
    for devices in (1, 2):  # XLA compiles each replica's forward and backward
        densenet = module.Densenet121Xray(TASKS["densenet121_xray"], run("densenet121_xray", devices))
        for step in range(2):
            densenet.train_step(images[4 * step:4 * step + 4], findings[4 * step:4 * step + 4])
            parallel.append(densenet.loss())
    out[profile] = {"cnn": losses + np.ravel(cnn.predict(images)).tolist(),
                    "resnet": np.ravel(resnet.predict(images)).tolist(),
                    "densenet": parallel + np.ravel(densenet.predict(images)).tolist(), "xla": xla}
print(json.dumps(out))
"""


@pytest.mark.integration
def test_tensorflow_compiled_models_do_the_default_models_work(tmp_path):
    """XLA-compiled steps and predictions (tf.function(jit_compile=True)) give the default
    tf.functions' losses and outputs, DenseNet on one device and mirrored on two."""
    out = _run("tensorflow", TENSORFLOW, tmp_path)
    assert (out["default"]["xla"], out["compiled"]["xla"]) == (False, True)
    for task in ("cnn", "resnet", "densenet"):
        assert out["compiled"][task] == pytest.approx(out["default"][task], rel=1e-4, abs=1e-5), task
