"""TensorFlow as its custom-training-loop guide trains: the bench's own networks
(bench/frameworks/tensorflow.py), a tf.data pipeline over the batches in memory, and a training
step traced once by tf.function around tf.GradientTape; channels-last on the CPU."""
import tensorflow as tf

from common import main

from bench.frameworks.tensorflow import build_cnn_cifar10, build_densenet121, build_gru_imdb, build_resnet50


def _dataset(batches):
    """The block's batches as a tf.data pipeline, as the guide feeds a loop."""
    x, y = zip(*batches)
    return tf.data.Dataset.from_tensor_slices((list(x), list(y)))


def _training(model, optimizer, loss_fn):
    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    def run(dataset):
        for x, y in dataset:
            loss = step(x, y)
        return float(loss)
    return _dataset, run


def _adam(spec):
    return tf.keras.optimizers.Adam(learning_rate=spec.learning_rate, epsilon=1e-8)


def _softmax_loss():
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def cnn_cifar10(spec, input_shape, batch_size):
    optimizer = tf.keras.optimizers.SGD(learning_rate=spec.learning_rate, momentum=spec.momentum)
    return "NHWC", _training(build_cnn_cifar10(spec, "channels_last"), optimizer, _softmax_loss())


def resnet50_inference(spec, input_shape, batch_size):
    channels, height, width = input_shape
    model = build_resnet50((height, width, channels), "channels_last")
    forward = tf.function(lambda x: model(x, training=False))
    return "NHWC", (_dataset, lambda dataset: [forward(x).numpy() for x, _ in dataset])


def gru_imdb(spec, input_shape, batch_size):
    return "NTC", _training(build_gru_imdb(spec), _adam(spec), _softmax_loss())


def densenet121_xray(spec, input_shape, batch_size):
    channels, height, width = input_shape
    model = build_densenet121(spec, (height, width, channels))
    return "NHWC", _training(model, _adam(spec), tf.keras.losses.BinaryCrossentropy(from_logits=True))


if __name__ == "__main__":
    main({"cnn_cifar10": cnn_cifar10, "resnet50_inference": resnet50_inference, "gru_imdb": gru_imdb,
          "densenet121_xray": densenet121_xray}, tf.keras.utils.set_random_seed)
