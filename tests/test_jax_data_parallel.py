"""JAX's data-parallel DenseNet-121 trains as every other framework's does: one replica per
device, each normalising with its own shard's batch statistics (as PyTorch's
DistributedDataParallel does), not with the global batch's (sync-BN, what jax.jit over a
sharded batch alone would do). Two XLA host devices stand for two GPUs; a small network of a
convolution, a batch norm and a dense layer stands in for DenseNet-121 inside the task's own
class, so that compiling takes seconds."""
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
spec = TASKS["densenet121_xray"]


class SmallNet(nnx.Module):
    def __init__(self, spec, dtype, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.norm = jax_module._batch_norm(4, dtype, rngs)
        self.classifier = nnx.Linear(4, spec.num_classes, rngs=rngs)

    def __call__(self, x):
        return self.classifier(nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2)))


jax_module.DenseNet121 = SmallNet


def task(devices, batch_size):
    run = RunOptions(device="cpu", devices=devices, seed=0, threads=None, batch_size=batch_size,
                     input_shape=(3, 8, 8), learning_rate=spec.learning_rate)
    jax_module.configure(run)
    return jax_module.Densenet121Xray(spec, run)


def arrays(task, kind):
    # Batch statistics, or Adam's first moments: after one step, 0.1 × the gradients.
    model, optimizer, _ = nnx.merge(task._training, task._state)
    state = nnx.state(model, nnx.BatchStat) if kind == "stats" else optimizer.opt_state[0].mu
    return [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree.leaves(state)]


rng = np.random.default_rng(0)
# Two replicas' shards with different statistics: the second's pixels brighter and wider spread.
images = np.concatenate([rng.random((2, 8, 8, 3)), 3 + 5 * rng.random((2, 8, 8, 3))]).astype(np.float32)
labels = (rng.random((4, spec.num_classes)) < 0.5).astype(np.float32)

replicated, whole = task(2, 2), task(1, 4)
shards = [task(1, 2), task(1, 2)]
replicated.train_step(images, labels)
whole.train_step(images, labels)
for index, shard in enumerate(shards):
    shard.train_step(images[2 * index:2 * index + 2], labels[2 * index:2 * index + 2])

result = {"loss": replicated.loss(), "whole_loss": whole.loss(),
          "shards_loss": float(np.mean([shard.loss() for shard in shards]))}
for kind in ("stats", "moments"):
    found, of_whole = arrays(replicated, kind), arrays(whole, kind)
    of_shards = [np.mean(pair, axis=0) for pair in zip(*(arrays(shard, kind) for shard in shards))]
    result[kind] = max(float(np.abs(a - b).max()) for a, b in zip(found, of_shards))
    result["whole_" + kind] = max(float(np.abs(a - b).max()) for a, b in zip(found, of_whole))
# Every replica holds the same state.
result["replicas_differ"] = max(float(np.abs(np.asarray(leaf.addressable_shards[0].data)
                                             - np.asarray(leaf.addressable_shards[1].data)).max())
                                for leaf in jax.tree.leaves(replicated._state))
for _ in range(5):
    replicated.train_step(images, labels)
result["loss_after"] = replicated.loss()
result["predicted"] = replicated.predict(images[:3]).tolist()
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def replicas() -> dict:
    python = framework_python("jax")
    done = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_each_replica_normalises_with_its_own_shards_statistics(replicas):
    # The global batch's loss is the mean of the shards' losses as one-device models compute
    # them, which differs from a one-device model's over the whole batch (sync-BN's).
    assert replicas["loss"] == pytest.approx(replicas["shards_loss"], rel=1e-5)
    assert abs(replicas["loss"] - replicas["whole_loss"]) > 1e-3


@pytest.mark.integration
def test_gradients_and_running_statistics_are_the_replicas_mean(replicas):
    assert replicas["moments"] < 1e-6 < replicas["whole_moments"]
    assert replicas["stats"] < 1e-6 < replicas["whole_stats"]
    assert replicas["replicas_differ"] == 0


@pytest.mark.integration
def test_replicas_train_and_predict_every_example(replicas):
    assert replicas["loss_after"] < replicas["loss"]
    # Three images over two devices: the batch is padded to split evenly, the padding dropped.
    assert len(replicas["predicted"]) == 3
