"""Chainer's data-parallel DenseNet-121 on the CPU: one process per replica, gradients averaged
through shared memory. Runs in the Chainer environment (built and cached on first use)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, framework_python

pytestmark = pytest.mark.integration

# Two replicas trained in threads of one process (the same averaging, a threading barrier) are the
# reference: they must stay identical, and the two-process model must train exactly like them.
TRAIN_BOTH_WAYS = """
import json, threading
import numpy as np
import chainer
from bench.frameworks import chainer as bench_chainer
from bench.specs import TASKS, RunOptions

def main():
    spec = TASKS["densenet121_xray"]
    run = RunOptions(device="cpu", devices=2, seed=0, threads=2, batch_size=2, input_shape=(3, 32, 32),
                     learning_rate=spec.learning_rate * 2)
    bench_chainer.configure(run)
    rng = np.random.default_rng(0)
    batches = [(rng.random((4, 3, 32, 32), dtype=np.float32), (rng.random((4, 14)) > 0.5).astype(np.float32))
               for _ in range(2)]

    replicas = [bench_chainer.DensenetReplica(spec, run, rank) for rank in range(2)]
    initial = {name: p.array.copy() for name, p in replicas[0].model.namedparams()}
    size = bench_chainer._trainable_parameters(replicas[0].model)
    rows, barrier = bytearray(4 * 2 * size), threading.Barrier(2)
    for rank, replica in enumerate(replicas):
        replica.gradient_mean = bench_chainer.SharedMemoryMean(2, rows, barrier, rank)
    for images, labels in batches:
        steps = [threading.Thread(target=replica.train_step, args=(images[2 * r:2 * r + 2], labels[2 * r:2 * r + 2]))
                 for r, replica in enumerate(replicas)]
        for step in steps:
            step.start()
        for step in steps:
            step.join()
    params = [{name: p.array for name, p in replica.model.namedparams()} for replica in replicas]

    model = bench_chainer.Densenet121Xray(spec, run)
    inputs, labels = (np.concatenate(arrays) for arrays in zip(*batches))
    for rows, _ in model.array_batches(inputs, labels, 4, None):  # each rank takes its half of the rows
        model.train_step(rows, None)
    loss = model.loss()
    processes = {name: p.array for name, p in model.model.namedparams()}
    model.close()
    reference_loss = np.mean([r.read_loss() for r in replicas])
    print(json.dumps({
        "replicas_identical": all(np.array_equal(params[0][n], params[1][n]) for n in params[0]),
        "moved": max(float(np.abs(params[0][n] - initial[n]).max()) for n in initial),
        "largest_difference": max(float(np.abs(processes[n] - params[0][n]).max()) for n in processes),
        "loss": loss, "reference_loss": float(reference_loss)}))

if __name__ == "__main__":
    main()
"""


def test_two_processes_train_like_two_replicas_averaging_their_gradients(tmp_path):
    python = framework_python("chainer")
    script = tmp_path / "train_both_ways.py"  # a file: spawned workers import their parent's main module
    script.write_text(TRAIN_BOTH_WAYS)
    done = subprocess.run([str(python), str(script)], capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["replicas_identical"] and found["moved"] > 1e-6
    assert found["largest_difference"] < 1e-5
    assert found["loss"] == pytest.approx(found["reference_loss"], rel=1e-5)
