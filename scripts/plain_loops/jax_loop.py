"""JAX as Flax NNX's guides train in hot loops: the bench's own networks
(bench/frameworks/jax.py), an optax optimiser, and a jitted step over (graphdef, state)."""
import functools

import jax
import numpy as np
import optax
from flax import nnx

from common import SEED, main

from bench.frameworks.jax import CnnCifar10Net, DenseNet121, GruImdbNet, Resnet50


def _training(model, transform, loss_fn):
    graph, state = nnx.split((model, nnx.Optimizer(model, transform, wrt=nnx.Param)))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, x, y):
        model, optimizer = nnx.merge(graph, state)
        loss, grads = nnx.value_and_grad(lambda model: loss_fn(model(x), y))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    def run(batches):
        nonlocal state
        for x, y in batches:
            loss, state = step(state, x, y)
        jax.block_until_ready(state)
        return float(loss)
    return list, run


def _softmax_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def cnn_cifar10(spec, input_shape, batch_size):
    model = CnnCifar10Net(spec, None, nnx.Rngs(SEED))
    return "NHWC", _training(model, optax.sgd(spec.learning_rate, momentum=spec.momentum), _softmax_loss)


def resnet50_inference(spec, input_shape, batch_size):
    model = Resnet50(None, nnx.Rngs(SEED))
    model.eval()
    graph, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
    return "NHWC", (list, lambda batches: [np.asarray(forward(state, x)) for x, _ in batches])


def gru_imdb(spec, input_shape, batch_size):
    model = GruImdbNet(spec, None, nnx.Rngs(SEED))
    return "TNC", _training(model, optax.adam(spec.learning_rate), _softmax_loss)


def densenet121_xray(spec, input_shape, batch_size):
    model = DenseNet121(spec, None, nnx.Rngs(SEED))
    loss = lambda logits, labels: optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    return "NHWC", _training(model, optax.adam(spec.learning_rate), loss)


if __name__ == "__main__":
    main({"cnn_cifar10": cnn_cifar10, "resnet50_inference": resnet50_inference, "gru_imdb": gru_imdb,
          "densenet121_xray": densenet121_xray}, None)
