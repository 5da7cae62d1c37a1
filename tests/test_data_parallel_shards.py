"""Data-parallel DenseNet-121 in the frameworks that run a process per replica (PyTorch, Chainer):
every rank loads its own shard of each global batch, in its own process, and the shards of one
step are disjoint and make up the global batch.

Two CPU ranks train through the protocol, on a ChestX-ray14 folder (each rank's own loader:
PyTorch's DataLoader, Chainer's iterator) and on array data (rows every rank indexes itself).
The script logs, from every process, which files its loader decoded and which array rows its
replica trained on."""
from __future__ import annotations

import json
import math
import os
import subprocess
from collections import defaultdict

import pytest

from conftest import REPO, framework_python, write_chestxray14

pytestmark = pytest.mark.integration

TRAIN_FILES, GLOBAL_BATCH, EXAMPLES = 36, 8, 32

RANKS = """
import importlib, json, os, sys
from pathlib import Path

import numpy as np

from bench import data as datasets
from bench.protocol import measure_throughput, train_full
from bench.result import ResultSettings
from bench.specs import TASKS, RunOptions

EXAMPLES = int(os.environ["EXAMPLES"])
framework = importlib.import_module("bench.frameworks." + os.environ["FRAMEWORK"])
images_class, decode = {"pytorch": ("ChestXrayImages", "__getitem__"),
                        "chainer": ("XrayImages", "get_example")}[os.environ["FRAMEWORK"]]


def log(**entry):
    with open(Path(os.environ["RANK_LOG"]) / f"{os.getpid()}.jsonl", "a") as out:
        out.write(json.dumps(dict(entry, pid=os.getpid(), parent=os.getppid())) + "\\n")


def log_before(cls, method, entry):
    original = getattr(cls, method)

    def logged(self, *args, **keywords):
        entry(self, *args, **keywords)
        return original(self, *args, **keywords)
    setattr(cls, method, logged)


# At the top level: spawned ranks run this file too, and their loaders' workers are forked from them.
log_before(framework.DensenetReplica, "__init__", lambda self, spec, run, rank: log(rank=rank))
log_before(getattr(framework, images_class), decode,
           lambda self, index: self.training and log(file=int(index), seed=self.seed))
# Spawned ranks see the environment of their start: the array model's ranks start after this is set.
log_before(framework.DensenetReplica, "train_step", lambda self, images, labels: os.environ.get("ARRAYS")
           and log(rows=np.rint(np.asarray(images)[:, 0, 0, 0] * EXAMPLES).astype(int).tolist()))

if __name__ == "__main__":
    spec = TASKS["densenet121_xray"]
    run = RunOptions(device="cpu", devices=2, seed=0, threads=2, batch_size=4, input_shape=(3, 32, 32),
                     learning_rate=spec.learning_rate * 2, loader_workers=2)
    framework.configure(run)
    settings = ResultSettings(warmup_steps=1, steps=2, repeats=2, epochs=1, seed=5)
    files = datasets.load_chestxray14(Path(sys.argv[1]), stored_size=38)
    full = train_full([framework.Densenet121Xray(spec, run)], spec, files, settings, run)
    os.environ["ARRAYS"] = "1"
    arrays = datasets.synthetic(spec, (3, 32, 32), EXAMPLES, 0, seed=0)
    arrays.x_train[:, 0, 0, 0] = np.arange(EXAMPLES) / EXAMPLES  # each example's number, in a pixel
    throughput = measure_throughput(framework.Densenet121Xray(spec, run), spec, arrays, settings, run)
    print(json.dumps({"files": [full.loss_last, full.test_roc_auc.median, full.throughput_per_s],
                      "arrays": [throughput.loss_first, throughput.loss_last, throughput.throughput_per_s]}))
"""


@pytest.fixture(scope="module", params=["pytorch", "chainer"])
def two_ranks(request, tmp_path_factory) -> tuple[dict, list[dict]]:
    """(the script's metrics, every process's log entries, each with the rank of its process)."""
    folder = tmp_path_factory.mktemp("ranks")
    python = framework_python(request.param)
    script, log = folder / "ranks.py", folder / "log"
    script.write_text(RANKS)
    log.mkdir()
    xray = write_chestxray14(folder / "chestxray14", train=TRAIN_FILES, test=8, size=40)
    done = subprocess.run([str(python), str(script), str(xray)], capture_output=True, text=True, cwd=REPO,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(REPO), "RANK_LOG": str(log),
                                            "EXAMPLES": str(EXAMPLES), "FRAMEWORK": request.param})
    assert done.returncode == 0, done.stderr[-3000:]
    entries = [json.loads(line) for path in sorted(log.iterdir()) for line in path.read_text().splitlines()]
    rank_of = {entry["pid"]: entry["rank"] for entry in entries if "rank" in entry}
    for entry in entries:  # a loader's worker logs under its rank's process
        entry["rank"] = rank_of.get(entry["pid"], rank_of.get(entry["parent"]))
    return json.loads(done.stdout.strip().splitlines()[-1]), entries


def by_rank(entries: list[dict], key: str) -> dict[int, list]:
    """Each rank's logged values of ``key``, in the order logged."""
    found = defaultdict(list)
    for entry in entries:
        if key in entry:
            found[entry["rank"]].append(entry[key])
    return found


@pytest.mark.timeout(900)
def test_each_rank_decodes_its_own_disjoint_share_of_the_epochs_files(two_ranks):
    decoded = by_rank(two_ranks[1], "file")
    steps = TRAIN_FILES // GLOBAL_BATCH  # whole global batches only
    assert set(decoded) == {0, 1}
    for files in decoded.values():
        assert len(files) == len(set(files)) == steps * GLOBAL_BATCH // 2
    assert not set(decoded[0]) & set(decoded[1])
    assert {entry["seed"] for entry in two_ranks[1] if "file" in entry} == {5}  # the epoch's seed, on both ranks


@pytest.mark.timeout(900)
def test_each_rank_trains_on_its_half_of_every_global_batch_of_arrays(two_ranks):
    trained = by_rank(two_ranks[1], "rows")
    half = GLOBAL_BATCH // 2
    batches = EXAMPLES // GLOBAL_BATCH
    assert set(trained) == {0, 1} and len(trained[0]) == len(trained[1]) == 1 + 2 * 2  # warm-up, 2 × 2 steps
    for rank, steps in trained.items():
        for step, rows in enumerate(steps):  # throughput mode cycles over the data's batches in order
            first = step % batches * GLOBAL_BATCH + rank * half
            assert rows == list(range(first, first + half)), (rank, step)


@pytest.mark.timeout(900)
def test_two_ranks_train_with_a_sane_mean_loss_and_score_the_test_set(two_ranks):
    metrics, _ = two_ranks
    loss, roc_auc, files_per_s = metrics["files"]
    first, last, arrays_per_s = metrics["arrays"]
    for value in (loss, first, last):
        assert math.isfinite(value) and 0.2 < value < 1.5  # binary cross-entropy from ln 2
    assert 0.0 <= roc_auc <= 1.0
    assert files_per_s > 0 and arrays_per_s > 0
