"""Chainer as its tutorials train without a Trainer: the bench's own networks
(bench/frameworks/chainer.py), an optimizer set up on the model, and a define-by-run loop."""
import chainer
import numpy as np
import chainer.functions as F
from chainer import optimizers

from common import main

from bench.frameworks.chainer import CnnCifar10Net, Densenet121, GruImdbNet, Resnet50


def _training(model, optimizer, loss_fn, prepare=list):
    optimizer.setup(model)

    def run(batches):
        for x, y in batches:
            loss = loss_fn(model(x), y)
            model.cleargrads()
            loss.backward()
            optimizer.update()
        return float(loss.array)
    return prepare, run


def cnn_cifar10(spec, input_shape, batch_size):
    optimizer = optimizers.MomentumSGD(lr=spec.learning_rate, momentum=spec.momentum)
    return "NCHW", _training(CnnCifar10Net(spec), optimizer, F.softmax_cross_entropy)


def resnet50_inference(spec, input_shape, batch_size):
    model = Resnet50()

    def run(batches):
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            return [model(x).array for x, _ in batches]
    return "NCHW", (list, run)


def gru_imdb(spec, input_shape, batch_size):
    optimizer = optimizers.Adam(alpha=spec.learning_rate, eps=1e-8)
    return "NTC", _training(GruImdbNet(spec), optimizer, F.softmax_cross_entropy)


def densenet121_xray(spec, input_shape, batch_size):
    optimizer = optimizers.Adam(alpha=spec.learning_rate, eps=1e-8)
    # Chainer's sigmoid cross-entropy takes integer targets.
    prepare = lambda batches: [(x, y.astype(np.int32)) for x, y in batches]
    return "NCHW", _training(Densenet121(spec.num_classes), optimizer, F.sigmoid_cross_entropy, prepare)


if __name__ == "__main__":
    main({"cnn_cifar10": cnn_cifar10, "resnet50_inference": resnet50_inference, "gru_imdb": gru_imdb,
          "densenet121_xray": densenet121_xray}, np.random.seed)
