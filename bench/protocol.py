"""The measurement protocols, the same for every framework.

An implementation (one class per task in each ``bench/frameworks/<name>.py``) offers:

    layout                  the input layout it takes: NCHW or NHWC for images, NTC or TNC
                            (its recurrent layer's) for token sequences
    parameter_note          None, or why its trainable parameters differ from the task's count
    parameter_count()       trainable parameters
    train_step(x, y)        one optimiser step on a global batch (training tasks); it splits the
                            batch over the devices of a data-parallel run
    train_steps(batches, steps)
                            instead of train_step where the framework's users train through its
                            own loop: one optimiser step on each of the next ``steps`` batches of
                            ``batches`` (an iterable of global batches, or the model's own
                            input_pipeline, which then has a len), in one call (Keras: one fit())
    loss()                  the last step's loss, after the device has finished (the barrier); after
                            train_steps, the loss its training loop reports for those steps
    predict(x)              outputs for one batch in inference mode, as a numpy array: logits,
                            label probabilities or features
    math_modes()            optional: the math modes (bench/precision.py) the framework chose for
                            this model while it ran, where they may differ from describe()'s
                            (Keras's compile() drops XLA for a model with a layer XLA cannot compile)
    loader_workers          image-folder tasks: the workers its input_pipeline runs (the run's
                            loader_workers), or None where the framework's reader picks its own
    input_pipeline(files, stored_size, batch_size, training, seed)
                            image-folder data only: global batches (x, y) from the framework's
                            own loader: decode, resize to stored_size, random crop to the input
                            size and random horizontal flip when training, centre crop otherwise
    array_batches(inputs, labels, batch_size, order)
                            optional, array data: the global batches for train_step of the rows
                            in ``order`` (None: as stored), whole batches only; where absent,
                            slices of the reordered arrays. For a data-parallel run whose
                            replicas load their own shards of the arrays they hold

throughput: the first step (timed alone: the time to the first step), the rest of the warm-up,
then timed blocks of ``steps`` steps, each block lasting at least ``min_block_s`` when the steps
are calibrated; at least ``repeats`` blocks, then more until the median's 95% interval is within
±``target_ci`` of it, ``max_repeats`` blocks are timed or ``budget_s`` is spent (the result says
which). The clock stops only after the device has finished (a loss or an output is read back).
full: the seed's protocol: training tasks train ``epochs`` epochs (timed) then score the test
set; inference tasks time ``timed_batches`` batches after one untimed batch; a fresh model per
repeat, each after a first model has taken the first step (the time to the first step), so
what only happens once per process (tracing, compiling, autotuning) is outside the epochs;
what happens per model (a tf.function's tracing) stays in each repeat's first epoch, which the
result also gives alone.
Array data is put in the model's layout outside the timers; the per-batch copy to the device
happens inside them. Image-folder data is decoded inside them: that is what it measures.
A monitor (bench/gpu_state.py's sampler on a GPU) is told where each timed block or run starts
and ends, outside its timer, and how many examples it took.
"""
import functools
import itertools
import math
import time
from typing import Any, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .data import Data, Dataset, ImageFolderDataset, to_layout
from .result import Metrics, ResultSettings, Summary
from .shards import global_batches
from .specs import CLASSIFY, INFER, RunOptions, TaskSpec

Batch = Tuple[Any, Any]


def _batches(inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> List[Batch]:
    """Whole batches only, as the seed did; the remainder of an epoch is dropped."""
    return [(inputs[batch.rows], labels[batch.rows]) for batch in global_batches(len(inputs), batch_size, None)]


def _training_batches(model: Any, inputs: np.ndarray, labels: np.ndarray, batch_size: int,
                      order: Optional[np.ndarray] = None) -> List[Batch]:
    """Global batches of array data for training, in ``order`` (None: as stored)."""
    if hasattr(model, "array_batches"):
        return list(model.array_batches(inputs, labels, batch_size, order))
    if order is not None:
        inputs, labels = inputs[order], labels[order]
    return _batches(inputs, labels, batch_size)


def _check_loss(loss: float) -> float:
    if not math.isfinite(loss):
        raise FloatingPointError("training diverged: the loss is {}".format(loss))
    return loss


def _train(model: Any, batches: Iterable[Batch], steps: Optional[int] = None) -> int:
    """One optimiser step on each of the next ``steps`` batches (None: all of them), through the
    framework's own training loop where it has one; returns the steps trained."""
    if hasattr(model, "train_steps"):
        steps = len(batches) if steps is None else steps  # type: ignore
        if steps:  # a loop over no batches is no loop (Keras's fit() refuses one)
            model.train_steps(batches, steps)
        return steps
    trained = 0
    for inputs, labels in itertools.islice(batches, steps):
        model.train_step(inputs, labels)
        trained += 1
    return trained


def _endless(model: Any, data: Data, run: RunOptions, inference: bool, pool: Optional[int]) -> Iterator[Batch]:
    """Batches round and round, of the first ``pool`` examples (None: all): for training as the
    model takes them, for inference the arrays themselves."""
    if isinstance(data, ImageFolderDataset) and pool is not None:  # one epoch's pipeline, as the model takes it
        return model.input_pipeline(data.train, data.stored_size, run.global_batch_size, True, run.seed)
    if isinstance(data, ImageFolderDataset):
        return itertools.chain.from_iterable(
            model.input_pipeline(data.train, data.stored_size, run.global_batch_size, True, run.seed + epoch)
            for epoch in itertools.count())
    arrays = to_layout(data.x_train[:pool], model.layout), data.y_train[:pool]
    batches = (_batches if inference else functools.partial(_training_batches, model))(*arrays, run.global_batch_size)
    if not batches:
        raise ValueError("the data set has fewer than one batch of {} examples".format(run.global_batch_size))
    return itertools.cycle(batches)


class Unwatched:
    """The monitor of the timed blocks when none is given: it watches nothing."""

    def block_started(self) -> None:
        pass

    def block_ended(self, examples: int) -> None:
        pass


UNWATCHED = Unwatched()


class ThroughputBlocks:
    """Throughput mode's unit of work: ``run(steps)`` trains on the next ``steps`` batches and
    reads the loss back (the device barrier), or infers ``steps`` batches, each output a numpy
    array (the device has finished); the first output is kept for its moments. Full mode's
    first step uses one too, over the first batch alone (``pool``)."""

    def __init__(self, model: Any, spec: TaskSpec, data: Data, run: RunOptions, pool: Optional[int] = None):
        self.model = model
        self.inference = spec.kind == INFER
        self.batches = _endless(model, data, run, self.inference, pool)
        self.batch_size = run.global_batch_size
        self.first_output = None  # type: Optional[np.ndarray]

    def run(self, steps: int) -> Optional[float]:
        if not self.inference:
            _train(self.model, self.batches, steps)
            return _check_loss(self.model.loss())
        for _ in range(steps):
            output = self.model.predict(next(self.batches)[0])
            if self.first_output is None:
                self.first_output = output
        return None

    def timed(self, steps: int, monitor: Any = UNWATCHED) -> Tuple[float, Optional[float]]:
        """Seconds per step of ``steps`` steps, and the loss after them."""
        monitor.block_started()
        start = time.perf_counter()
        loss = self.run(steps)
        elapsed = time.perf_counter() - start
        monitor.block_ended(steps * self.batch_size)
        return elapsed / steps, loss


def calibrated_steps(blocks: ThroughputBlocks, min_block_s: float) -> int:
    """Steps per block so that a block lasts at least ``min_block_s``: blocks of 1, 2, 4...
    steps (untimed, like warm-up) until one lasts a fifth of it, scaled up from that one."""
    steps = 1
    while True:
        per_step, _ = blocks.timed(steps)
        if per_step * steps >= min_block_s / 5:
            return max(1, math.ceil(min_block_s / per_step))
        steps *= 2


def ci_half_width(summary: Summary) -> Optional[float]:
    """The larger side of the median's 95% interval, as a fraction of the median."""
    if summary.ci95 is None or not summary.median:
        return None
    low, high = summary.ci95
    return max(summary.median - low, high - summary.median) / summary.median


def measure_throughput(model: Any, spec: TaskSpec, data: Data, settings: ResultSettings,
                       run: RunOptions, monitor: Any = UNWATCHED) -> Metrics:
    """The first step timed alone, the rest of the warm-up, then timed blocks of
    ``settings.steps`` steps (calibrated when 0): ``settings.repeats`` of them, and with
    ``settings.timing`` more until the median's 95% interval is within ±target_ci of it, the
    budget is spent or max_repeats are timed. Writes the steps and repeats reached into ``settings``.
    ``monitor`` watches those blocks alone."""
    blocks = ThroughputBlocks(model, spec, data, run)
    timing = settings.timing
    metrics = Metrics()
    metrics.first_step_s, metrics.loss_first = blocks.timed(1)
    if settings.warmup_steps > 1:
        blocks.run(settings.warmup_steps - 1)
    if not settings.steps:
        settings.steps = calibrated_steps(blocks, timing.min_block_s)
    step_times = []  # type: List[float]
    timed_s = 0.0
    while True:
        per_step, metrics.loss_last = blocks.timed(settings.steps, monitor)
        step_times.append(per_step)
        timed_s += per_step * settings.steps
        if len(step_times) < settings.repeats:
            continue
        summary = Summary.of(step_times)
        if timing is None:
            break
        timing.ci_half_width = ci_half_width(summary)
        stopped_by = ("target" if timing.target_reached else "max_repeats" if len(step_times) >= timing.max_repeats
                      else "budget" if timed_s >= timing.budget_s else None)
        if stopped_by:
            timing.stopped_by, timing.timed_s = stopped_by, timed_s
            break
    settings.repeats = len(step_times)
    metrics.step_time_s = summary
    metrics.throughput_per_s = run.global_batch_size / summary.median
    if spec.kind == INFER:
        metrics.seconds_per_1000 = Summary.of([t * 1000 / run.global_batch_size for t in step_times])
        metrics.output_mean, metrics.output_std = _moments(blocks.first_output)
    return metrics


def infer_full(models: Iterable[Any], spec: TaskSpec, data: Dataset, run: RunOptions,
               monitor: Any = UNWATCHED) -> Metrics:
    """The seed's feature-extraction protocol: one untimed batch, then ``timed_batches``
    batches timed, per repeat (a fresh model each); ``monitor`` watches the timed batches."""
    inputs = [x for x, _ in _batches(to_layout(data.x_train, "NCHW"), data.y_train, run.batch_size)]
    per_1000, outputs = [], []  # type: List[float], List[np.ndarray]
    prepared = {}
    for model in models:
        if model.layout not in prepared:
            prepared[model.layout] = [to_layout(x, model.layout) for x in inputs]
        batches = prepared[model.layout]
        model.predict(batches[0])
        monitor.block_started()
        start = time.perf_counter()
        for index in range(spec.timed_batches):
            output = model.predict(batches[index % len(batches)])
            if not outputs:
                outputs.append(output)
        elapsed = time.perf_counter() - start
        monitor.block_ended(spec.timed_batches * run.batch_size)
        per_1000.append(elapsed * 1000 / (spec.timed_batches * run.batch_size))
    seconds_per_1000 = Summary.of(per_1000)
    mean, std = _moments(outputs[0])
    return Metrics(seconds_per_1000=seconds_per_1000, throughput_per_s=1000 / seconds_per_1000.median,
                   output_mean=mean, output_std=std)


def train_full(models: Iterable[Any], spec: TaskSpec, data: Data, settings: ResultSettings,
               run: RunOptions, monitor: Any = UNWATCHED) -> Metrics:
    """``epochs`` epochs of training per repeat (a fresh model each), then the test score;
    ``monitor`` watches each epoch."""
    train_times, epoch_times, first_epochs, scores = [], [], [], []  # type: List[float], List[float], List[float], List[float]
    loss_last = None
    batch_size = run.global_batch_size
    prepared = {}  # array data, in each layout once (not per repeat)
    trained_per_epoch = 0
    for repeat, model in enumerate(models):
        repeat_time = 0.0
        for epoch in range(settings.epochs):
            epoch_seed = settings.seed + repeat * settings.epochs + epoch
            if isinstance(data, ImageFolderDataset):
                batches = model.input_pipeline(data.train, data.stored_size, batch_size, True, epoch_seed)
            else:
                if model.layout not in prepared:
                    prepared[model.layout] = (to_layout(data.x_train, model.layout),
                                              to_layout(data.x_test, model.layout))
                order = np.random.default_rng(epoch_seed).permutation(len(data.x_train))
                batches = _training_batches(model, prepared[model.layout][0], data.y_train, batch_size, order)
            monitor.block_started()
            start = time.perf_counter()
            steps = _train(model, batches)  # an image pipeline decodes inside the timer
            loss_last = _check_loss(model.loss())
            elapsed = time.perf_counter() - start
            monitor.block_ended(steps * batch_size)
            epoch_times.append(elapsed)
            if epoch == 0:
                first_epochs.append(elapsed)
            repeat_time += elapsed
            trained_per_epoch = steps * batch_size
        train_times.append(repeat_time)
        scores.append(_score(model, spec, data, prepared, batch_size))
    epoch_time = Summary.of(epoch_times)
    score = Summary.of(scores)
    metrics = Metrics(train_time_s=Summary.of(train_times), epoch_time_s=epoch_time,
                      throughput_per_s=trained_per_epoch / epoch_time.median, loss_last=loss_last,
                      first_epoch_s=Summary.of(first_epochs))
    if spec.kind == CLASSIFY:
        metrics.test_accuracy = score
    else:
        metrics.test_roc_auc = score
    return metrics


def _score(model: Any, spec: TaskSpec, data: Data, prepared: dict, batch_size: int) -> float:
    """Test accuracy (classification) or mean ROC-AUC over the labels (multi-label)."""
    if isinstance(data, ImageFolderDataset):
        # Unshuffled and complete when not training: the batches follow the file list.
        outputs = [model.predict(x) for x, _ in model.input_pipeline(data.test, data.stored_size, batch_size, False, 0)]
        labels = data.test.labels
    else:
        x_test = prepared[model.layout][1]
        outputs = [model.predict(x_test[start:start + batch_size]) for start in range(0, len(x_test), batch_size)]
        labels = data.y_test
    scores = np.concatenate(outputs) if outputs else np.zeros((0, spec.num_classes))
    if len(scores) != len(labels):
        raise ValueError("the model scored {} test examples of {}".format(len(scores), len(labels)))
    if spec.kind == CLASSIFY:
        return float(np.mean(np.argmax(scores, axis=1) == labels))
    return mean_roc_auc(scores, labels)


def mean_roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over labels of the area under the ROC curve (the Mann-Whitney statistic, ties
    counted half); labels with only one class in the test set are left out."""
    areas = []
    for column in range(labels.shape[1]):
        positive = labels[:, column] > 0.5
        positives, negatives = int(positive.sum()), int((~positive).sum())
        if positives == 0 or negatives == 0:
            continue
        ranks = _average_ranks(scores[:, column])
        areas.append((ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))
    if not areas:
        raise ValueError("no label has both positive and negative examples in the test set")
    return float(np.mean(areas))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse]


def _moments(output: np.ndarray) -> Tuple[Optional[float], Optional[float]]:
    """Mean and spread of one batch's outputs: with the same weights file and the same seeded
    inputs, every framework must give the same two numbers."""
    values = np.asarray(output, dtype=np.float64)
    return float(values.mean()), float(values.std())
