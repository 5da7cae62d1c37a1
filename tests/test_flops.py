"""FLOPs counted from each task's layers: the same walk counts the task's trainable
parameters exactly, and the totals agree with the figures the architectures are known by."""
from __future__ import annotations

import pytest

from bench import flops
from bench.specs import TASKS


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_layers_counted_are_the_layers_the_task_specifies(task):
    spec = TASKS[task]
    assert flops.network(spec, spec.input_shape).parameters == spec.expected_parameters


def test_forward_flops_of_each_network():
    forward = {name: flops.network(spec, spec.input_shape).flops for name, spec in TASKS.items()}
    # By hand: the CNN's four convolutions and two dense layers, 62,264,320 multiply-adds.
    assert forward["cnn_cifar10"] == 2 * (32 * 32 * 50 * 27 + 32 * 32 * 50 * 450 + 16 * 16 * 100 * 450
                                          + 16 * 16 * 100 * 900 + 6400 * 512 + 512 * 10)
    # ResNet-50 is known as 4.1 G multiply-adds at 224x224, DenseNet-121 as 2.9 G.
    assert forward["resnet50_inference"] / 2e9 == pytest.approx(4.09, abs=0.01)
    assert forward["densenet121_xray"] / 2e9 == pytest.approx(2.83, abs=0.05)
    # The GRU: 150 steps of three gates over input (125) and state (100), then 100 x 2.
    assert forward["gru_imdb"] == 2 * (150 * 3 * 100 * 225 + 200)


def test_a_training_step_counts_three_forward_passes_and_inference_one():
    cnn, resnet = TASKS["cnn_cifar10"], TASKS["resnet50_inference"]
    assert flops.step_flops_per_example(cnn, cnn.input_shape) == 3 * flops.network(cnn, cnn.input_shape).flops
    assert flops.step_flops_per_example(resnet, resnet.input_shape) == flops.network(resnet, resnet.input_shape).flops


def test_resizable_tasks_are_counted_at_the_size_they_ran():
    spec = TASKS["densenet121_xray"]
    small, full = (flops.network(spec, spec.input_shape_at(size)) for size in (64, 224))
    assert small.parameters == full.parameters
    assert small.flops < full.flops / 10
