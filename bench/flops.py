"""Analytic work per example of each task's network, counted from its layers.

Counted: 2 floating-point operations per multiply-add of convolutions, dense layers and the
GRU's matrix products. Not counted: element-wise work (activations, batch norm, pooling,
additions, the loss), which is bound by memory bandwidth and small beside the products. A
training step is counted as 3 forward passes (the backward pass computes gradients for the
inputs and for the weights, each as much work as the forward pass); an inference step as one.

The same walk over the layers counts trainable parameters, which tests compare with each
task's ``expected_parameters``: the layers counted are the layers the task specifies.
Standard library only, valid Python 3.6, like the rest of the bench outside frameworks/.
"""
from typing import Sequence, Tuple

from .specs import INFER, TaskSpec

BACKWARD_FACTOR = 3  # forward + gradients for inputs + gradients for weights


class Count:
    """Multiply-adds and trainable parameters, accumulated layer by layer over one example."""

    def __init__(self, channels: int, height: int = 1, width: int = 1):
        self.channels, self.height, self.width = channels, height, width
        self.macs = 0
        self.parameters = 0

    def conv(self, filters: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = False) -> "Count":
        self.height = (self.height + 2 * padding - kernel) // stride + 1
        self.width = (self.width + 2 * padding - kernel) // stride + 1
        self.macs += self.height * self.width * filters * self.channels * kernel * kernel
        self.parameters += filters * self.channels * kernel * kernel + (filters if bias else 0)
        self.channels = filters
        return self

    def batch_norm(self) -> "Count":
        self.parameters += 2 * self.channels  # scale and shift; running statistics are not trained
        return self

    def pool(self, kernel: int, stride: int, padding: int = 0) -> "Count":
        self.height = (self.height + 2 * padding - kernel) // stride + 1
        self.width = (self.width + 2 * padding - kernel) // stride + 1
        return self

    def global_pool(self) -> "Count":
        self.height = self.width = 1
        return self

    def dense(self, units: int) -> "Count":
        inputs = self.channels * self.height * self.width
        self.macs += inputs * units
        self.parameters += inputs * units + units
        self.channels, self.height, self.width = units, 1, 1
        return self

    @property
    def flops(self) -> int:
        return 2 * self.macs


def cnn_cifar10(input_shape: Sequence[int], classes: int) -> Count:
    count = Count(*input_shape)
    for filters in (50, 100):
        count.conv(filters, 3, padding=1, bias=True).conv(filters, 3, padding=1, bias=True).pool(2, 2)
    return count.dense(512).dense(classes)


def resnet50(input_shape: Sequence[int], features: int) -> Count:
    """ResNet-50 v1.5 without convolution biases, cut after global pooling (``features`` is
    its output width, 2048: no dense layer)."""
    count = Count(*input_shape).conv(64, 7, stride=2, padding=3).batch_norm().pool(3, 2, padding=1)
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for block in range(blocks):
            block_stride = stride if block == 0 else 1
            entering = (count.channels, count.height, count.width)
            count.conv(width, 1).batch_norm()
            count.conv(width, 3, stride=block_stride, padding=1).batch_norm()  # v1.5: stride here
            count.conv(4 * width, 1).batch_norm()
            if block == 0:  # the projection shortcut, counted from the block's input
                shortcut = Count(*entering).conv(4 * width, 1, stride=block_stride).batch_norm()
                count.macs += shortcut.macs
                count.parameters += shortcut.parameters
    assert count.channels == features
    return count.global_pool()


def densenet121(input_shape: Sequence[int], outputs: int, growth: int = 32, bottleneck: int = 4) -> Count:
    count = Count(*input_shape).conv(64, 7, stride=2, padding=3).batch_norm().pool(3, 2, padding=1)
    for number, layers in enumerate((6, 12, 24, 16)):
        for _ in range(layers):
            # BN-ReLU-conv 1x1 to 4k channels, BN-ReLU-conv 3x3 to k, concatenated to the input.
            entering = count.channels
            count.batch_norm().conv(bottleneck * growth, 1).batch_norm().conv(growth, 3, padding=1)
            count.channels = entering + growth
        if number < 3:  # transition: BN-ReLU-conv 1x1 halving the channels, 2x2 average pooling
            count.batch_norm().conv(count.channels // 2, 1).pool(2, 2)
    return count.batch_norm().global_pool().dense(outputs)


def gru_imdb(sequence: int, vocabulary: int, embedding: int = 125, units: int = 100, classes: int = 2) -> Count:
    count = Count(embedding)
    count.parameters += vocabulary * embedding  # a lookup: no arithmetic
    # cuDNN's GRU: three gates, each with input and recurrent weights and two bias vectors.
    count.macs += sequence * 3 * units * (embedding + units)
    count.parameters += 3 * (units * embedding + units * units + 2 * units)
    count.channels = units
    return count.dense(classes)


def network(spec: TaskSpec, input_shape: Tuple[int, ...]) -> Count:
    """The task's network counted at ``input_shape`` (resizable tasks run at other sizes)."""
    if spec.name == "cnn_cifar10":
        return cnn_cifar10(input_shape, spec.num_classes)
    if spec.name == "resnet50_inference":
        return resnet50(input_shape, spec.num_classes)
    if spec.name == "densenet121_xray":
        return densenet121(input_shape, spec.num_classes)
    if spec.name == "gru_imdb":
        return gru_imdb(input_shape[0], spec.vocabulary)
    raise KeyError("no FLOP count for task {}".format(spec.name))


def step_flops_per_example(spec: TaskSpec, input_shape: Tuple[int, ...]) -> int:
    """Floating-point operations one example costs in one timed step of the task."""
    forward = network(spec, input_shape).flops
    return forward if spec.kind == INFER else BACKWARD_FACTOR * forward
