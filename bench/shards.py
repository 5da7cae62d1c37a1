"""Batches named instead of handed over, for models that hold their data themselves: the ranks of
a data-parallel run that each load their own shard of every global batch (PyTorch's and
Chainer's, a process per replica) instead of rank 0 loading the whole batch and sending the
pieces, and Keras, whose fit() takes a block's rows of the arrays at once. Numpy only."""
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np


class LoaderStep(NamedTuple):
    """A global batch of image files as input_pipeline yields it when training: which step of
    which epoch (named by its seed) every rank's own loader is to produce its shard of."""
    seed: int
    step: int


class Rows(NamedTuple):
    """A global batch of array data as array_batches yields it: rows of the arrays the model
    holds, a slice or (shuffled) indices; each rank of a data-parallel run takes its share."""
    rows: Union[slice, np.ndarray]


def rank_share(batch: Rows, rank: int, ranks: int) -> Union[slice, np.ndarray]:
    """Rank ``rank``'s consecutive share of a global batch's rows: a view's slice of consecutive
    rows, or the indices to gather (as a sampler would over a shuffled epoch)."""
    rows = batch.rows
    size = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
    first, last = size * rank // ranks, size * (rank + 1) // ranks
    return slice(rows.start + first, rows.start + last) if isinstance(rows, slice) else rows[first:last]


def global_batches(count: int, batch_size: int, order: Optional[np.ndarray]) -> Iterator[Rows]:
    """The whole global batches of ``count`` rows taken in ``order`` (None: as stored)."""
    starts = range(0, count - batch_size + 1, batch_size)
    if order is None:
        return (Rows(slice(start, start + batch_size)) for start in starts)
    return (Rows(order[start:start + batch_size]) for start in starts)


class RankGroup:
    """The dispatch a data-parallel model with a process per replica shares (PyTorch's,
    Chainer's): rank 0's replica (``rank0``) runs in this process, ranks 1..N-1 in ``workers``,
    each reading (method, arguments) from its queue in ``commands`` and calling that method of
    its own replica. The model sets the three, and ``held`` (None) for the arrays every rank
    holds; ``shared`` is how an array travels to the ranks (as it is: pickled once)."""
    rank0: Any
    workers: List[Any]
    commands: List[Any]
    held: Optional[Tuple[np.ndarray, np.ndarray]]

    def shared(self, array: np.ndarray) -> Any:
        return array

    def _on_every_rank(self, method: str, *arguments: Any) -> Any:
        """Replica.method(*arguments) on every rank (workers first, each checked: a dead rank
        would leave the others waiting in a collective); rank 0's result."""
        for rank, (worker, inbox) in enumerate(zip(self.workers, self.commands), start=1):
            if not worker.is_alive():
                raise RuntimeError("DenseNet replica {} exited (code {})".format(rank, worker.exitcode))
            inbox.put((method, arguments))
        return getattr(self.rank0, method)(*arguments)

    def train_step(self, inputs: Any, labels: Any) -> None:
        """One step on a global batch, each rank loading its own shard: a LoaderStep from
        input_pipeline, which every rank's loader decodes its shard of; Rows from array_batches,
        of the arrays every rank holds; or, with one rank, the batch itself."""
        if isinstance(inputs, LoaderStep):
            self._on_every_rank("train_on_next_shard", inputs)
        elif isinstance(inputs, Rows):
            self._on_every_rank("train_on_rows", inputs)
        elif self.workers:  # rank 0 alone would wait for the others in the all-reduce
            raise TypeError("a data-parallel step takes a LoaderStep or Rows, not the batch itself")
        else:
            self.rank0.train_step(inputs, labels)

    def array_batches(self, inputs: np.ndarray, labels: np.ndarray, batch_size: int,
                      order: Optional[np.ndarray]) -> Iterator[Tuple[Any, Any]]:
        """Global batches of array data: with several ranks, Rows of the arrays, which every rank
        is given once (here, before any timed step) and indexes itself."""
        if not self.workers:
            for batch in global_batches(len(inputs), batch_size, order):
                yield inputs[batch.rows], labels[batch.rows]
            return
        if self.held is None or self.held[0] is not inputs or self.held[1] is not labels:
            self.held = None  # the previous arrays can go before the next are copied
            self._on_every_rank("hold_arrays", self.shared(inputs), self.shared(labels))
            self.held = inputs, labels  # held here too, so that the identity check stays valid
        for batch in global_batches(len(inputs), batch_size, order):
            yield batch, None
