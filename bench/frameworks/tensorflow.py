"""TensorFlow: tf.keras layers, a tf.function training step with tf.GradientTape."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..specs import TaskSpec


def describe(device: str) -> dict:
    build = tf.sysconfig.get_build_info()
    on_gpu = device == "gpu"
    return {
        "framework": "tensorflow",
        "framework_version": tf.__version__,
        # 0 means "let TensorFlow choose" (one thread per core).
        "threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "interop_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "cuda": build.get("cuda_version") if on_gpu else None,
        "cudnn": build.get("cudnn_version") if on_gpu else None,
        "framework_settings": {
            "keras_version": tf.keras.__version__,
        },
    }


def configure(device: str, seed: int, threads: int | None) -> None:
    tf.keras.utils.set_random_seed(seed)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    if device == "gpu":
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    else:
        tf.config.set_visible_devices([], "GPU")


def _tf_device(device: str) -> str:
    return "/GPU:0" if device == "gpu" else "/CPU:0"


def build_cnn_cifar10(spec: TaskSpec, data_format: str) -> tf.keras.Model:
    layers = tf.keras.layers
    channels, height, width = spec.input_shape
    shape = (channels, height, width) if data_format == "channels_first" else (height, width, channels)
    conv = dict(kernel_size=3, padding="same", data_format=data_format,
                kernel_initializer="glorot_uniform", bias_initializer="zeros")
    dense = dict(kernel_initializer="glorot_uniform", bias_initializer="zeros")
    return tf.keras.Sequential([
        tf.keras.Input(shape=shape),
        layers.Conv2D(50, activation="relu", **conv),
        layers.Conv2D(50, **conv), layers.MaxPooling2D(2, data_format=data_format), layers.ReLU(), layers.Dropout(0.25),
        layers.Conv2D(100, activation="relu", **conv),
        layers.Conv2D(100, **conv), layers.MaxPooling2D(2, data_format=data_format), layers.ReLU(), layers.Dropout(0.25),
        layers.Flatten(data_format=data_format),
        layers.Dense(512, activation="relu", **dense), layers.Dropout(0.5),
        layers.Dense(spec.num_classes, **dense),  # logits: softmax lives in the loss
    ])


class CnnCifar10:
    def __init__(self, spec: TaskSpec, device: str, seed: int):
        tf.keras.utils.set_random_seed(seed)
        self.device = _tf_device(device)
        # NCHW for cuDNN; TensorFlow's CPU convolutions (oneDNN) only take NHWC.
        self.layout = "NCHW" if device == "gpu" else "NHWC"
        data_format = "channels_first" if self.layout == "NCHW" else "channels_last"
        with tf.device(self.device):
            self.model = build_cnn_cifar10(spec, data_format)
            self.loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            self.optimizer = tf.keras.optimizers.SGD(learning_rate=spec.learning_rate, momentum=spec.momentum)
        batch_shape = (None, *self.model.input_shape[1:])
        signature = [tf.TensorSpec(batch_shape, tf.float32), tf.TensorSpec((None,), tf.int32)]
        self._train_step = tf.function(self._train_step_eager, input_signature=signature)
        self._predict = tf.function(lambda x: tf.argmax(self.model(x, training=False), axis=1),
                                    input_signature=signature[:1])
        self._last_loss: tf.Tensor | None = None

    def parameter_count(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.model.trainable_variables))

    def _train_step_eager(self, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            loss = self.loss_fn(labels, logits)
        gradients = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        return loss

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None:
        with tf.device(self.device):
            # The numpy batch is copied to the device here, inside the timed step.
            self._last_loss = self._train_step(images, labels)

    def loss(self) -> float:
        """The last step's loss, after the device has finished all queued work."""
        if self.device == "/GPU:0":
            tf.test.experimental.sync_devices()
        return float(self._last_loss.numpy())

    def predict(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        with tf.device(self.device):
            return np.concatenate([
                self._predict(images[start:start + batch_size]).numpy()
                for start in range(0, len(images), batch_size)
            ])


TASKS = {"cnn_cifar10": CnnCifar10}
