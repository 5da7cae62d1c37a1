"""Task specifications: the one place that says what every framework must build.

Shared by the bench (inside a framework environment) and the harness (on the host),
so it imports nothing beyond the standard library.
"""
from __future__ import annotations

from dataclasses import dataclass

# Matrix names. Keras 3 runs on three backends; each is its own framework environment.
FRAMEWORKS = ("pytorch", "tensorflow", "keras-tensorflow", "keras-jax", "keras-torch", "jax", "mxnet", "chainer")
# Names that stand for several frameworks in matrix.yml.
FRAMEWORK_GROUPS = {"keras": ("keras-tensorflow", "keras-jax", "keras-torch")}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    # Trainable parameters of the seed's network; every implementation must match it.
    expected_parameters: int
    batch_size: int
    epochs: int
    learning_rate: float
    momentum: float
    num_classes: int
    # Channel-first shape of one example, as the seed's data is stored.
    input_shape: tuple[int, ...]
    train_examples: int
    test_examples: int
    # What one training step consumes, for throughput figures.
    item: str
    frameworks: tuple[str, ...]


CNN_CIFAR10 = TaskSpec(
    name="cnn_cifar10",
    title="VGG-style CNN on CIFAR-10, training",
    expected_parameters=3_441_592,
    batch_size=64,
    epochs=10,
    learning_rate=0.01,
    momentum=0.9,
    num_classes=10,
    input_shape=(3, 32, 32),
    train_examples=50_000,
    test_examples=10_000,
    item="images",
    frameworks=FRAMEWORKS,
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (CNN_CIFAR10,)}
