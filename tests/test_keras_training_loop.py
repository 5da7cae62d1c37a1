"""The protocol times a framework's own training loop where it has one (Keras: fit() over a
block of batches) and the per-step loop elsewhere: the same batches, the same steps."""
from __future__ import annotations

import itertools

import numpy as np

from bench import protocol
from bench.data import Dataset
from bench.result import ResultSettings
from bench.specs import TASKS, RunOptions


class PerStep:
    layout = "NCHW"

    def __init__(self):
        self.trained: list[np.ndarray] = []

    def train_step(self, inputs, labels):
        self.trained.append(labels)

    def loss(self):
        return 1.0

    def predict(self, inputs):
        return np.zeros((len(inputs), 10))


class OwnLoop(PerStep):
    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def train_steps(self, batches, steps):
        self.calls.append(steps)
        self.trained += [labels for _, labels in itertools.islice(batches, steps)]


def data(examples: int = 40) -> Dataset:
    labels = np.arange(examples) % 10
    return Dataset(x_train=np.zeros((examples, 3, 2, 2), np.float32), y_train=labels,
                   x_test=np.zeros((8, 3, 2, 2), np.float32), y_test=labels[:8], source="synthetic")


def run_options() -> RunOptions:
    return RunOptions(device="cpu", devices=1, seed=0, threads=None, batch_size=4, input_shape=(3, 2, 2),
                      learning_rate=0.01)


def test_throughput_gives_each_warmup_and_timed_block_to_the_loop_in_one_call():
    settings = ResultSettings(warmup_steps=3, steps=5, repeats=2, epochs=1, seed=0)
    own, per_step = OwnLoop(), PerStep()
    for model in (own, per_step):
        protocol.measure_throughput(model, TASKS["cnn_cifar10"], data(), settings, run_options())
    assert own.calls == [1, 2, 5, 5]
    assert [list(b) for b in own.trained] == [list(b) for b in per_step.trained]


def test_full_gives_each_epoch_to_the_loop_in_one_call():
    settings = ResultSettings(warmup_steps=0, steps=0, repeats=1, epochs=2, seed=0)
    own = OwnLoop()
    metrics = protocol.train_full([own], TASKS["cnn_cifar10"], data(), settings, run_options())
    assert own.calls == [10, 10] and len(own.trained) == 20
    assert metrics.throughput_per_s > 0


def test_a_single_warm_up_step_leaves_no_empty_block_for_the_loop():
    # Keras's fit() refuses a generator that yields nothing: one warm-up step is one call.
    settings = ResultSettings(warmup_steps=1, steps=1, repeats=1, epochs=1, seed=0)
    own = OwnLoop()
    protocol.measure_throughput(own, TASKS["cnn_cifar10"], data(), settings, run_options())
    assert own.calls == [1, 1]
