"""MXNet as Gluon's guides train: the bench's own networks (bench/frameworks/mxnet.py),
hybridized, a gluon.Trainer, autograd.record around the forward pass."""
import mxnet as mx
from mxnet import autograd, gluon

from common import main

from bench.frameworks.mxnet import GruNet, Resnet50, build_cnn_cifar10, build_densenet121


def _training(net, optimizer, optimizer_params, loss_fn):
    net.initialize()  # the bench's layers carry their initializers
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = gluon.Trainer(net.collect_params(), optimizer, optimizer_params)

    def run(batches):
        for x, y in batches:
            x, y = mx.nd.array(x, dtype=x.dtype), mx.nd.array(y, dtype="float32")
            with autograd.record():
                loss = loss_fn(net(x), y)
            loss.backward()
            trainer.step(x.shape[0])
        mx.nd.waitall()
        return float(loss.mean().asscalar())
    return list, run


def cnn_cifar10(spec, input_shape, batch_size):
    return "NCHW", _training(build_cnn_cifar10(spec), "sgd",
                             {"learning_rate": spec.learning_rate, "momentum": spec.momentum},
                             gluon.loss.SoftmaxCrossEntropyLoss())


def resnet50_inference(spec, input_shape, batch_size):
    net = Resnet50()
    net.initialize()
    net.hybridize(static_alloc=True, static_shape=True)
    return "NCHW", (list, lambda batches: [net(mx.nd.array(x)).asnumpy() for x, _ in batches])


def gru_imdb(spec, input_shape, batch_size):
    return "TNC", _training(GruNet(spec), "adam",
                            {"learning_rate": spec.learning_rate}, gluon.loss.SoftmaxCrossEntropyLoss())


def densenet121_xray(spec, input_shape, batch_size):
    return "NCHW", _training(build_densenet121(spec), "adam",
                             {"learning_rate": spec.learning_rate}, gluon.loss.SigmoidBinaryCrossEntropyLoss())


if __name__ == "__main__":
    main({"cnn_cifar10": cnn_cifar10, "resnet50_inference": resnet50_inference, "gru_imdb": gru_imdb,
          "densenet121_xray": densenet121_xray}, mx.random.seed)
