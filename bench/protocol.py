"""The measurement protocols, the same for every framework.

throughput: warm-up steps (never timed), then ``repeats`` timed blocks of ``steps`` steps; the
clock stops only after the device has finished (the loss is read back).
full: the seed's protocol: ``epochs`` epochs of training timed, then test accuracy.
Data is prepared (layout, shuffling) outside the timers; the per-batch copy to the device
happens inside them, in ``train_step``.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Protocol

import numpy as np

from .data import Dataset, to_layout
from .result import Metrics, Settings, Summary


class Trainer(Protocol):
    layout: str

    def parameter_count(self) -> int: ...
    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None: ...
    def loss(self) -> float: ...
    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray: ...


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Whole batches only, as the seed did; the remainder of an epoch is dropped."""
    return [(images[start:start + batch_size], labels[start:start + batch_size])
            for start in range(0, len(images) - batch_size + 1, batch_size)]


def _check_loss(loss: float) -> float:
    if not math.isfinite(loss):
        raise FloatingPointError(f"training diverged: the loss is {loss}")
    return loss


def measure_throughput(trainer: Trainer, data: Dataset, settings: Settings, batch_size: int) -> Metrics:
    batches = _batches(to_layout(data.x_train, trainer.layout), data.y_train, batch_size)
    if not batches:
        raise ValueError(f"the data set has fewer than one batch of {batch_size} examples")
    cursor = 0

    def run(steps: int) -> float:
        nonlocal cursor
        for _ in range(steps):
            trainer.train_step(*batches[cursor % len(batches)])
            cursor += 1
        return trainer.loss()

    loss_first = None
    if settings.warmup_steps:
        loss_first = _check_loss(run(1))
        run(settings.warmup_steps - 1)
    step_times = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        loss_last = run(settings.steps)  # reading the loss back is the device barrier
        step_times.append((time.perf_counter() - start) / settings.steps)
    step_time = Summary.of(step_times)
    return Metrics(step_time_s=step_time, throughput_per_s=batch_size / step_time.median,
                   loss_first=loss_first, loss_last=_check_loss(loss_last))


def train_full(trainers: Iterable[Trainer], data: Dataset, settings: Settings,
               batch_size: int) -> Metrics:
    train_times, epoch_times, accuracies = [], [], []
    loss_last = None
    in_layout: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # converted once, not per repeat
    for repeat, trainer in enumerate(trainers):  # a fresh model per repeat
        if trainer.layout not in in_layout:
            in_layout[trainer.layout] = (to_layout(data.x_train, trainer.layout),
                                         to_layout(data.x_test, trainer.layout))
        x_train, x_test = in_layout[trainer.layout]
        shuffle = np.random.default_rng(settings.seed + repeat)
        repeat_time = 0.0
        for _ in range(settings.epochs):
            order = shuffle.permutation(len(x_train))
            batches = _batches(x_train[order], data.y_train[order], batch_size)
            start = time.perf_counter()
            for images, labels in batches:
                trainer.train_step(images, labels)
            loss_last = _check_loss(trainer.loss())
            elapsed = time.perf_counter() - start
            epoch_times.append(elapsed)
            repeat_time += elapsed
        train_times.append(repeat_time)
        predictions = trainer.predict(x_test, batch_size)
        accuracies.append(float(np.mean(predictions == data.y_test)))
    epoch_time = Summary.of(epoch_times)
    trained_per_epoch = len(data.x_train) // batch_size * batch_size
    return Metrics(train_time_s=Summary.of(train_times), epoch_time_s=epoch_time,
                   test_accuracy=Summary.of(accuracies),
                   throughput_per_s=trained_per_epoch / epoch_time.median, loss_last=loss_last)
