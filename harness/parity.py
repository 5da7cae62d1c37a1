#!/usr/bin/env python
"""Parity check: is every framework running the same model?

Trains the CIFAR-10 CNN in every framework on a small real data set — scikit-learn's 8x8
handwritten digits, written in CIFAR-10's official on-disk format (upsampled to 32x32x3,
fixed train/test split) — and compares test accuracies, the way the seed's authors checked
their implementations: the same model trained the same way lands within a few points.

    python harness/parity.py [--frameworks pytorch tensorflow ...] [--epochs 5] [--tolerance 0.05]

Exit status: 0 when every framework trained and the accuracies agree, 1 when not, 2 for bad input.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tabulate import tabulate  # noqa: E402

from bench.result import write_text_atomic  # noqa: E402
from bench.specs import FRAMEWORK_SPECS, FRAMEWORKS  # noqa: E402
from harness import backends, run_matrix  # noqa: E402
from harness.backends.base import REPO_ROOT  # noqa: E402
from harness.cifar_format import write_batches  # noqa: E402
from harness.results import load_results  # noqa: E402

TRAIN_BATCHES = 5
UPSAMPLE = 4  # 8x8 digits -> 32x32, CIFAR-10's size
# Frameworks that run in local environments (CNTK needs its own image).
LOCAL_FRAMEWORKS = tuple(name for name, spec in FRAMEWORK_SPECS.items() if not spec.image_only)


def write_digits_as_cifar10(folder: Path, seed: int = 0) -> tuple[int, int]:
    """Write scikit-learn's digits as a cifar-10-batches-py folder; returns the train and test sizes."""
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    large = np.kron(pixels, np.ones((UPSAMPLE, UPSAMPLE), dtype=np.uint8))  # nearest-neighbour upsampling
    rgb = np.repeat(large[:, None], 3, axis=1)  # grey: the same plane three times
    x_train, x_test, y_train, y_test = train_test_split(
        rgb, digits.target, test_size=0.2, random_state=seed, stratify=digits.target)
    train = list(zip(np.array_split(x_train, TRAIN_BATCHES), np.array_split(y_train, TRAIN_BATCHES)))
    write_batches(folder, train, (x_test, y_test))
    return len(x_train), len(x_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python harness/parity.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frameworks", nargs="+", default=list(LOCAL_FRAMEWORKS),
                        choices=FRAMEWORKS, metavar="FRAMEWORK",
                        help=f"default: all of {', '.join(LOCAL_FRAMEWORKS)}")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest allowed gap between the best and worst test accuracy")
    parser.add_argument("--floor", type=float, default=0.80, help="lowest acceptable test accuracy")
    parser.add_argument("--gpu", default="auto", help="as in matrix.yml: auto, cpu or a GPU model")
    parser.add_argument("--backend", choices=backends.CHOICES, default="auto")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "results" / f"parity-{socket.gethostname()}")
    args = parser.parse_args(argv)
    if args.epochs < 1 or not 0 < args.tolerance < 1 or not 0 <= args.floor < 1:
        parser.error("--epochs must be at least 1, --tolerance and --floor between 0 and 1")

    data_dir = args.results / "digits-as-cifar10"
    train, test = write_digits_as_cifar10(data_dir / "cifar-10-batches-py")
    matrix = args.results / "parity.yml"
    write_text_atomic(matrix, (
        f"# Written by harness/parity.py: {train} training and {test} test digits in CIFAR-10's format.\n"
        f"matrix:\n  framework: [{', '.join(args.frameworks)}]\n  task: [cnn_cifar10]\n"
        f"  gpu: [{args.gpu}]\n"
        f"settings:\n  mode: full\n  data: real\n  data_dir: {data_dir.resolve()}\n"
        f"  epochs: {args.epochs}\n  repeats: 1\n"))
    # Accuracy alone is compared here: no matrix-multiply ceiling to time.
    run_matrix.main([str(matrix), "--results", str(args.results), "--backend", args.backend, "--no-ceiling"])

    results = [r for _, r in load_results(args.results / "cells").results
               if r.cell.task == "cnn_cifar10" and r.cell.framework in args.frameworks and r.settings and r.settings.epochs == args.epochs]
    accuracy = {r.cell.framework: r.metrics.test_accuracy.median for r in results if r.status == "ok"}
    rows = [[f, f"{accuracy[f]:.3f}" if f in accuracy else "did not run"] for f in args.frameworks]
    print(tabulate(rows, headers=["framework", f"test accuracy after {args.epochs} epochs"]))
    problems = [f"{f} did not train" for f in args.frameworks if f not in accuracy]
    problems += [f"{f}: {a:.3f} is below the floor {args.floor:.2f}" for f, a in accuracy.items() if a < args.floor]
    if len(accuracy) > 1 and max(accuracy.values()) - min(accuracy.values()) > args.tolerance:
        problems.append(f"accuracies span {max(accuracy.values()) - min(accuracy.values()):.3f}, "
                        f"more than the tolerance {args.tolerance:.2f}")
    for problem in problems:
        print(f"parity: {problem}", file=sys.stderr)
    print("parity: " + ("FAILED" if problems else f"ok, {len(accuracy)} frameworks agree within {args.tolerance:.2f}"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
