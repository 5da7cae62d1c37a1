"""Keras's data-parallel DenseNet-121 trains as every other framework's does: on JAX
(keras.distribution) each replica normalises its own slice of the batch, as each process or
replica does elsewhere. (tests/test_integration.py's slow test trains it on two devices, and
checks that Keras on TensorFlow runs it without XLA there as at one device.)"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, framework_python

# A sharded batch of two replicas through ReplicaBatchNormalization, against the stock layer
# run on each replica's slice alone.
PER_REPLICA = """
import json
import numpy as np
from bench import frameworks
keras_module = frameworks.load("keras-jax")
import jax, keras

distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu"))
keras.distribution.set_distribution(distribution)
x = np.random.default_rng(0).normal(2, 3, (8, 4, 4, 5)).astype("float32")
per_replica = keras_module.ReplicaBatchNormalization(2, momentum=0.9, epsilon=1e-5)
stock = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
per_replica.build(x.shape)
stock.build(x.shape)
sharded = jax.device_put(x, distribution.get_data_layout(x.shape).backend_layout)
# A training step as fit() compiles it: one jitted, stateless call on the sharded batch.
step = jax.jit(lambda trainable, statistics, batch: per_replica.stateless_call(trainable, statistics, batch,
                                                                               training=True))
outputs, (moving_mean, _) = step([v.value for v in per_replica.trainable_variables],
                                 [v.value for v in per_replica.non_trainable_variables], sharded)
expected = np.concatenate([np.asarray(stock(x[:4], training=True)), np.asarray(stock(x[4:], training=True))])
slice_means = (x[:4].mean((0, 1, 2)) + x[4:].mean((0, 1, 2))) / 2
print(json.dumps({"outputs": float(np.abs(np.asarray(outputs) - expected).max()),
                  "moving_mean": float(np.abs(np.asarray(moving_mean) - 0.1 * slice_means).max()),
                  "inference": float(np.abs(np.asarray(per_replica(x)) - np.asarray(stock.__class__(
                      momentum=0.9, epsilon=1e-5)(x))).max())}))
"""


@pytest.mark.integration
def test_keras_on_jax_normalises_each_replicas_slice_with_its_own_statistics():
    python = framework_python("keras-jax")
    done = subprocess.run([str(python), "-c", PER_REPLICA], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": "jax",
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors["outputs"] < 1e-5 and errors["moving_mean"] < 1e-6, errors
    assert errors["inference"] < 1e-5, errors  # fresh moving statistics: the stock layer's inference
