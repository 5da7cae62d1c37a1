"""Keras 3 as its guides train, on the backend KERAS_BACKEND names: the bench's own networks
(bench/frameworks/keras.py), compile() with its defaults, then fit() over the arrays in memory
(predict() for inference); channels-last on the CPU."""
import numpy as np
import keras

from common import main

from bench.frameworks.keras import build_cnn_cifar10, build_densenet121, build_gru_imdb, build_resnet50


def _arrays(batches):
    """The block's batches as the two arrays a Keras user holds: fit() batches them itself."""
    x, y = zip(*batches)
    return np.concatenate(x), np.concatenate(y), len(x[0])


def _training(model, optimizer, loss):
    model.compile(optimizer=optimizer, loss=loss)

    def run(arrays):
        x, y, batch_size = arrays
        history = model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        return history.history["loss"][-1]
    return _arrays, run


def _adam(spec):
    return keras.optimizers.Adam(learning_rate=spec.learning_rate, epsilon=1e-8)


def _softmax_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def cnn_cifar10(spec, input_shape, batch_size):
    optimizer = keras.optimizers.SGD(learning_rate=spec.learning_rate, momentum=spec.momentum)
    return "NHWC", _training(build_cnn_cifar10(spec, "channels_last"), optimizer, _softmax_loss())


def resnet50_inference(spec, input_shape, batch_size):
    model = build_resnet50(input_shape, "channels_last")

    def run(arrays):
        x, _, batch_size = arrays
        return model.predict(x, batch_size=batch_size, verbose=0)
    return "NHWC", (_arrays, run)


def gru_imdb(spec, input_shape, batch_size):
    return "NTC", _training(build_gru_imdb(spec), _adam(spec), _softmax_loss())


def densenet121_xray(spec, input_shape, batch_size):
    model = build_densenet121(input_shape, spec.num_classes, "channels_last")
    return "NHWC", _training(model, _adam(spec), keras.losses.BinaryCrossentropy(from_logits=True))


if __name__ == "__main__":
    main({"cnn_cifar10": cnn_cifar10, "resnet50_inference": resnet50_inference, "gru_imdb": gru_imdb,
          "densenet121_xray": densenet121_xray}, keras.utils.set_random_seed)
