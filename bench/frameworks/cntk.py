"""CNTK 2.7: the layers library (Sequential, Convolution2D, BatchNormalization, Recurrence), a
cntk.Trainer with CNTK's own learners, data parallelism through MPI (one process per device)
and CNTK's own image reader.

CNTK 2.7 is the last release: its wheels exist only for CPython 3.5/3.6 and need OpenMPI 1.10,
so it runs in its own image (images/cntk), and this module stays valid Python 3.6.
CNTK is channel-first everywhere: images are NCHW on CPU and GPU alike.
"""
import atexit
import ctypes
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple, Union

import numpy as np
import cntk as C

from .. import precision
from .. import weights as canonical
from ..data import ImageFiles
from ..specs import (BATCH_NORM, CNN, DENSENET121, GLOROT_UNIFORM, GRU, HE_NORMAL, ONES, ORTHOGONAL, RESNET50,
                     UNIFORM, ZEROS, Init, RunOptions, TaskSpec, Unsupported)


def describe(run: RunOptions) -> dict:
    on_gpu = run.device == "gpu"
    return {
        "framework": "cntk",
        "framework_version": C.__version__.strip(),
        "threads": C.cntk_py.get_max_num_cputhreads(),
        "interop_threads": None,  # CNTK runs one operation at a time
        "cuda": _cuda_runtime_version() if on_gpu else None,
        "cudnn": _cudnn_version() if on_gpu else None,
        "math_modes": precision.math_modes(
            run.precision, tf32_matmul=False if on_gpu else None, tf32_convolutions=False if on_gpu else None,
            loss_scaling=None,
            # On unless deterministic algorithms are forced (configure).
            autotuner=not C.cntk_py.should_force_deterministic_algorithms() if on_gpu else None,
            xla=False, compiler=None),
        "framework_settings": {
            "device": _device_name(),
            # Data-parallel tasks: one MPI process per device, gradients all-reduced by the
            # data-parallel distributed learner.
            "mpi_workers": C.train.distributed.Communicator.num_workers() if run.devices > 1 else None,
        },
    }


def _device_name() -> str:
    device = C.device.use_default_device()
    return "gpu:{}".format(device.id()) if C.device.DeviceKind.GPU == device.type() else "cpu"


def _cuda_runtime_version() -> Optional[str]:
    """The CUDA runtime the GPU build loaded (CNTK 2.7 is built for CUDA 10.0): CNTK itself
    does not report it."""
    try:
        library = ctypes.CDLL("libcudart.so.10.0")
    except OSError:
        return None
    version = ctypes.c_int()
    if library.cudaRuntimeGetVersion(ctypes.byref(version)) != 0:
        return None
    return "{}.{}".format(version.value // 1000, version.value % 1000 // 10)


def _cudnn_version() -> Optional[str]:
    """The cuDNN library the GPU build loaded (cuDNN 7 for CNTK 2.7)."""
    try:
        return str(ctypes.CDLL("libcudnn.so.7").cudnnGetVersion())
    except (OSError, AttributeError):
        return None


def configure(run: RunOptions) -> None:
    _seed(run)
    # CNTK's Trainer would set this to the hardware concurrency on first use anyway; setting it
    # here makes describe() report what runs.
    C.cntk_py.set_max_num_cputhreads(run.threads or os.cpu_count() or 1)
    device = C.device.gpu(_gpu_index(run)) if run.device == "gpu" else C.device.cpu()
    if not C.device.try_set_default_device(device):
        raise RuntimeError("CNTK cannot use {} (excluded, or locked by another process)".format(device))
    if run.devices > 1:
        # MPI must be finalised before the process exits, or mpiexec reports the worker as failed.
        atexit.register(C.train.distributed.Communicator.finalize)
    # CNTK picks cuDNN's convolution algorithms by timing them on first use (its autotuner has
    # no switch; force_deterministic_algorithms() would turn it off).


def device_memory_peak(run: RunOptions) -> Optional[int]:
    # CNTK reports no allocator statistics: NVML measures the cell.
    return None


def gemm(size: int, run: RunOptions) -> Callable[[], None]:
    """A function computing one product of two ``size`` x ``size`` matrices with the framework's
    own matrix multiply, returning once the device has finished (bench/ceiling.py). The two
    matrices are made once, here: seeded standard-normal values on the cell's device, in the
    precision's compute dtype."""
    rng = np.random.RandomState(run.seed)  # CNTK draws random values only inside a graph
    a, b = (C.constant(rng.standard_normal((size, size)).astype(precision.COMPUTE_DTYPES[run.precision]))
            for _ in range(2))  # on the default device (configure)
    # Evaluated for its first element: CNTK computes the whole product and copies that element back.
    first = C.slice(C.slice(C.times(a, b), 0, 0, 1), 1, 0, 1)

    def product() -> None:
        first.eval()
    return product


def _seed(run: RunOptions) -> None:
    """Parameters and dropout masks created after this draw from ``run.seed``: every repeat
    (and every MPI worker) starts from the same weights."""
    C.cntk_py.set_fixed_random_seed(run.seed)


def _gpu_index(run: RunOptions) -> int:
    """One GPU per MPI worker (by rank) in a data-parallel run; the first GPU otherwise."""
    if run.devices == 1:
        return 0
    gpus = [device for device in C.device.all_devices() if C.device.DeviceKind.GPU == device.type()]
    return C.train.distributed.Communicator.rank() % max(len(gpus), 1)


def _parameter_count(model: Any) -> int:
    return sum(int(np.prod(parameter.shape)) for parameter in model.parameters)


def _initializer(init: Init) -> Any:
    """The specs' initialiser as CNTK's: a number or one of its initializers."""
    if init.kind in (ZEROS, ONES):
        return 0.0 if init.kind == ZEROS else 1.0
    if init.kind == UNIFORM:
        return C.uniform(init.limit)
    if init.kind == GLOROT_UNIFORM:
        return C.glorot_uniform()
    if init.kind == HE_NORMAL and init.fan == "fan_in":
        return C.he_normal()
    raise ValueError("CNTK has no initializer for {}".format(init))


def _drawn(init: Init, shape: Tuple[int, ...], rng: np.random.RandomState) -> np.ndarray:
    """The specs' initialiser as an array drawn by numpy, for weights CNTK's initializers cannot
    lay out: an orthogonal matrix (CNTK has no initializer for one) and cuDNN's packed GRU
    weights (one blob takes one initializer). Fans as the specs' (rows out, columns in)."""
    if init.kind == ZEROS:
        return np.zeros(shape, np.float32)
    if init.kind == GLOROT_UNIFORM:
        limit = np.sqrt(6.0 / sum(shape))
        return rng.uniform(-limit, limit, shape).astype(np.float32)
    if init.kind == ORTHOGONAL:
        rows, columns = shape
        q, r = np.linalg.qr(rng.standard_normal((max(rows, columns), min(rows, columns))))
        q = q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix
        return np.ascontiguousarray(q if rows >= columns else q.T, dtype=np.float32)
    raise ValueError("no numpy draw for {}".format(init))


class GruWeights(NamedTuple):
    """A GRU's initial weights in cuDNN's convention, as cuDNN stores them: gates stacked reset,
    update, new along the rows, (gates × units, inputs) and (gates × units, units)."""
    input_kernel: np.ndarray
    recurrent_kernel: np.ndarray
    input_bias: np.ndarray
    recurrent_bias: np.ndarray

    @classmethod
    def drawn(cls, inputs: int, seed: int) -> "GruWeights":
        """The specs' initial weights, drawn by numpy from ``seed``: the same in every MPI worker
        and on either device."""
        rng, stacked = np.random.RandomState(seed), GRU.gates * GRU.units
        return cls(_drawn(GRU.input_kernel_init, (stacked, inputs), rng),
                   _drawn(GRU.recurrent_kernel_init, (stacked, GRU.units), rng),
                   _drawn(GRU.bias_init, (stacked,), rng), _drawn(GRU.bias_init, (stacked,), rng))

    def cudnn_blob(self) -> np.ndarray:
        """The weights as optimized_rnnstack's one parameter, (gates × (inputs + units + 2), units):
        cuDNN's packed buffer for one layer, read row by row, as CNTK's own converter of the
        blob reads it (cntk.misc.converter): the input matrix, the recurrent matrix, the input
        biases, the recurrent biases."""
        flat = np.concatenate([self.input_kernel.ravel(), self.recurrent_kernel.ravel(), self.input_bias,
                               self.recurrent_bias])
        return flat.reshape(-1, GRU.units)


def _one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """CNTK's softmax cross-entropy takes one-hot targets."""
    return np.eye(classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]


def _learner_options() -> dict:
    """CNTK sums the gradient over a minibatch and rescales learning rates to a reference
    minibatch size; IGNORE makes the learner average the gradient and apply the learning rate
    and momentum as given, per step, as the other frameworks do."""
    return {"minibatch_size": C.learners.IGNORE}


def _symmetric_padding(x: Any, size: int, stride: int) -> Tuple[Any, bool]:
    """PyTorch pads ``size // 2`` zeros on every side. CNTK's own padding (``pad=True``)
    centres the window on pixels 0, s, 2s...: the same windows, but at stride 2 on even sizes
    the padding it computes is one-sided (the far side is never reached), which cuDNN cannot
    express, and it refuses inputs smaller than the window (the last stages of small test
    images). Strided windows and those inputs get explicit symmetric zero padding, equal to
    PyTorch's by construction on every engine (after a ReLU, zeros are as good as -inf for
    max-pooling); the others CNTK's padding, symmetric at stride 1, which costs no copy.
    Returns the input to use and whether CNTK should pad it."""
    pad = size // 2
    if pad and (stride > 1 or min(x.shape[-2:]) < size):
        return C.pad(x, pattern=[(0, 0), (pad, pad), (pad, pad)]), False
    return x, pad > 0


class CnnCifar10:
    parameter_note = None
    layout = "NCHW"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        _seed(run)
        self.num_classes = spec.num_classes
        self.features = C.input_variable(run.input_shape)
        self.labels = C.input_variable(spec.num_classes)
        kernel = (CNN.kernel_size, CNN.kernel_size)
        # Initialisers set explicitly (the seed's lesson).
        with C.default_options(init=_initializer(CNN.kernel_init), init_bias=_initializer(CNN.bias_init)):
            layers = []
            for first, second in CNN.filters:
                layers += [C.layers.Convolution2D(kernel, first, pad=True, activation=C.relu),
                           C.layers.Convolution2D(kernel, second, pad=True),
                           C.layers.MaxPooling((2, 2), strides=2), C.relu, C.layers.Dropout(CNN.conv_dropout)]
            self.model = C.layers.Sequential(layers + [
                C.layers.Dense(CNN.dense_units, activation=C.relu), C.layers.Dropout(CNN.dense_dropout),
                C.layers.Dense(spec.num_classes),  # logits: softmax lives in the loss
            ])(self.features)
        loss = C.cross_entropy_with_softmax(self.model, self.labels)
        # Classic momentum (v = 0.9 v + g): CNTK's "unit gain" (v = 0.9 v + 0.1 g) off.
        learner = C.momentum_sgd(self.model.parameters, lr=spec.learning_rate, momentum=spec.momentum,
                                 unit_gain=False, **_learner_options())
        self.trainer = C.Trainer(self.model, loss, [learner])

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> None:
        # The trainer runs in training mode: dropout on.
        self.trainer.train_minibatch({self.features: images, self.labels: _one_hot(labels, self.num_classes)})

    def loss(self) -> float:
        """The last step's loss; reading it back waits for the device."""
        return float(self.trainer.previous_minibatch_loss_average)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.eval({self.features: images})  # eval runs in inference mode: dropout off


def _resnet50(features: Any, weights: Dict[str, np.ndarray]) -> Any:
    """ResNet-50 v1.5 up to global average pooling, built from weights with torchvision's names
    (the canonical file's): CNTK's way to import a network is to create its parameters and
    batch-norm statistics from the arrays (the layers library would initialise them itself).
    Convolution kernels are O×I×kH×kW in CNTK as in PyTorch; no convolution biases."""

    def conv_bn(x: Any, conv: str, bn: str, stride: int = 1) -> Any:
        kernel = weights[conv + ".weight"]
        x, pad = _symmetric_padding(x, kernel.shape[-1], stride)
        x = C.convolution(C.Parameter(init=kernel, name=conv), x, strides=(stride, stride),
                          auto_padding=[False, pad, pad])
        # Inference uses the running statistics; a positive running count marks them as
        # estimated (CNTK refuses inference with a count of 0: "nothing has been trained").
        return C.batch_normalization(
            x, C.Parameter(init=weights[bn + ".weight"], name=bn + ".weight"),
            C.Parameter(init=weights[bn + ".bias"], name=bn + ".bias"),
            C.Constant(weights[bn + ".running_mean"]), C.Constant(weights[bn + ".running_var"]),
            spatial=True, epsilon=BATCH_NORM.epsilon, use_cudnn_engine=True, running_count=C.Constant(1.0))

    x = C.relu(conv_bn(features, "conv1", "bn1", stride=2))
    x, _ = _symmetric_padding(x, 3, 2)
    x = C.layers.MaxPooling((3, 3), strides=2)(x)
    for stage, (width, blocks) in enumerate(RESNET50.stages, start=1):
        for block in range(blocks):
            prefix = "layer{}.{}.".format(stage, block)
            stride = 2 if stage > 1 and block == 0 else 1
            shortcut = x
            if block == 0:  # the projection: 1×1, stride s, + BN
                shortcut = conv_bn(x, prefix + "downsample.0", prefix + "downsample.1", stride)
            y = C.relu(conv_bn(x, prefix + "conv1", prefix + "bn1"))
            y = C.relu(conv_bn(y, prefix + "conv2", prefix + "bn2", stride))  # v1.5: stride on the 3×3
            x = C.relu(conv_bn(y, prefix + "conv3", prefix + "bn3") + shortcut)
    x = C.layers.GlobalAveragePooling()(x)
    return C.reshape(x, (x.shape[0],))


class Resnet50Inference:
    parameter_note = None
    layout = "NCHW"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        _seed(run)
        shapes = canonical.resnet50_shapes()
        # Without a weights file, the canonical random stand-in (batch-norm statistics near 0/1
        # keep the 50 layers finite), seeded.
        arrays = canonical.load(run.weights, shapes) if run.weights else canonical.random_weights(shapes, run.seed)
        self.features = C.input_variable(run.input_shape)
        self.model = _resnet50(self.features, arrays)

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        # eval runs in inference mode and returns numpy: the copy back waits for the device.
        return self.model.eval({self.features: images})


def _cudnn_gru_step(weights: GruWeights) -> Any:
    """One step of a GRU in cuDNN's convention, for Recurrence on the CPU, where CNTK has no
    fused RNN: biases on both the input and the recurrent projections, and the reset gate
    applied after the recurrent one, n = tanh(W_n x + b_Wn + r * (R_n h + b_Rn)). CNTK's layers
    GRU applies it before (and has one bias vector): another recurrence, 300 parameters fewer.
    Gates are stacked reset, update, new along the projections' outputs."""
    units = GRU.units
    # CNTK multiplies row vectors by the kernels: x (inputs) times (inputs, gates × units).
    input_kernel = C.parameter(init=np.ascontiguousarray(weights.input_kernel.T), name="W")
    recurrent_kernel = C.parameter(init=np.ascontiguousarray(weights.recurrent_kernel.T), name="R")
    input_bias = C.parameter(init=weights.input_bias, name="b_W")
    recurrent_bias = C.parameter(init=weights.recurrent_bias, name="b_R")

    @C.Function
    def step(h: Any, x: Any) -> Any:
        projected = C.times(x, input_kernel) + input_bias
        recurrent = C.times(h, recurrent_kernel) + recurrent_bias

        def gate(projection: Any, index: int) -> Any:
            return C.slice(projection, 0, index * units, (index + 1) * units)

        reset = C.sigmoid(gate(projected, 0) + gate(recurrent, 0))
        update = C.sigmoid(gate(projected, 1) + gate(recurrent, 1))
        new = C.tanh(gate(projected, 2) + reset * gate(recurrent, 2))
        return (1 - update) * new + update * h

    return step


class GruImdb:
    """Embedding -> GRU -> last step -> dense. On GPU, cuDNN's GRU (CNTK's optimized_rnnstack,
    the seed's choice); on CPU, where CNTK has no fused RNN, the same cell under Recurrence."""

    parameter_note = None
    # CNTK packs the N sequences of a minibatch time-major itself (its MBLayout interleaves them
    # step by step); the (N, T) ids are handed over as N sequences.
    layout = "TNC"

    def __init__(self, spec: TaskSpec, run: RunOptions):
        _seed(run)
        self.num_classes = spec.num_classes
        # Token ids as sequences of scalars (float: exact below 2**24), looked up in the
        # embedding table by gather: a dense gradient, as in the other frameworks.
        # layers.Embedding on sparse one-hot ids would give the table a sparse gradient, which
        # CNTK 2.7's CPU Adam rejects ("AdamUpdate: Feature Not Implemented").
        self.tokens = C.sequence.input_variable(1)
        self.labels = C.input_variable(spec.num_classes)
        table = C.parameter((spec.vocabulary, GRU.embedding), init=_initializer(GRU.embedding_init), name="embedding")
        x = C.reshape(C.gather(table, self.tokens), (GRU.embedding,))
        weights = GruWeights.drawn(GRU.embedding, run.seed)
        if run.device == "gpu":
            x = C.optimized_rnnstack(x, C.parameter(init=weights.cudnn_blob()), GRU.units, num_layers=1,
                                     recurrent_op="gru")
        else:
            x = C.layers.Recurrence(_cudnn_gru_step(weights))(x)
        dense = C.layers.Dense(spec.num_classes, init=_initializer(GRU.dense_kernel_init),
                               init_bias=_initializer(GRU.dense_bias_init))
        self.model = dense(C.sequence.last(x))  # logits
        loss = C.cross_entropy_with_softmax(self.model, self.labels)
        learner = C.adam(self.model.parameters, lr=run.learning_rate, momentum=0.9, variance_momentum=0.999,
                         epsilon=1e-8, unit_gain=True, **_learner_options())
        self.trainer = C.Trainer(self.model, loss, [learner])

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    @staticmethod
    def _sequences(ids: np.ndarray) -> np.ndarray:
        """(N, T) ids as N sequences of T scalars."""
        ids = np.asarray(ids)
        return ids.reshape(ids.shape + (1,)).astype(np.float32)

    def train_step(self, ids: np.ndarray, labels: np.ndarray) -> None:
        self.trainer.train_minibatch({self.tokens: self._sequences(ids),
                                      self.labels: _one_hot(labels, self.num_classes)})

    def loss(self) -> float:
        return float(self.trainer.previous_minibatch_loss_average)

    def predict(self, ids: np.ndarray) -> np.ndarray:
        return self.model.eval({self.tokens: self._sequences(ids)})


def _conv(x: Any, filters: int, size: int, stride: int = 1) -> Any:
    """A bias-free convolution padded as PyTorch's, initialised as the specs say."""
    x, pad = _symmetric_padding(x, size, stride)
    return C.layers.Convolution2D((size, size), filters, strides=stride, pad=pad, bias=False,
                                  init=_initializer(DENSENET121.conv_init))(x)


def _densenet121(features: Any, num_labels: int, batch_size: int) -> Any:
    """torchvision's DenseNet-121: BN-ReLU-conv1×1-BN-ReLU-conv3×3 dense layers concatenated
    along the channels, BN-ReLU-conv1×1-avgpool transitions halving the channels. CNTK's batch
    norm averages its running statistics over a time constant in samples: the one that weighs
    each batch of ``batch_size`` (a worker's) as the task's momentum does."""
    time_constant = BATCH_NORM.time_constant(batch_size)

    def _bn_relu(x: Any) -> Any:
        return C.relu(C.layers.BatchNormalization(map_rank=1, init_scale=_initializer(BATCH_NORM.scale_init),
                                                  normalization_time_constant=time_constant,
                                                  epsilon=BATCH_NORM.epsilon)(x))  # per channel

    x = _bn_relu(_conv(features, DENSENET121.stem, 7, stride=2))
    x, _ = _symmetric_padding(x, 3, 2)
    x = C.layers.MaxPooling((3, 3), strides=2)(x)
    channels = DENSENET121.stem
    for index, layers in enumerate(DENSENET121.blocks):
        for _ in range(layers):
            y = _conv(_bn_relu(x), DENSENET121.bottleneck_width, 1)
            y = _conv(_bn_relu(y), DENSENET121.growth, 3)
            x = C.splice(x, y, axis=0)
            channels += DENSENET121.growth
        if index < len(DENSENET121.blocks) - 1:
            channels = int(channels * DENSENET121.compression)
            x = C.layers.AveragePooling((2, 2), strides=2)(_conv(_bn_relu(x), channels, 1))
    x = C.layers.GlobalAveragePooling()(_bn_relu(x))
    dense = C.layers.Dense(num_labels, init=_initializer(DENSENET121.dense_kernel_init),
                           init_bias=_initializer(DENSENET121.dense_bias_init))
    return dense(x)  # logits; the sigmoid lives in the loss


class WorkerShard(NamedTuple):
    """This MPI worker's share of a global batch, as CNTK's reader decoded it for this worker
    alone (input_pipeline yields (WorkerShard, None) in a data-parallel run)."""
    images: np.ndarray
    labels: np.ndarray


class Densenet121Xray:
    """Data-parallel the CNTK way: one process per device under mpiexec, each training its
    share of every global batch, gradients all-reduced by the data-parallel distributed
    learner (32-bit, synchronous)."""

    parameter_note = None
    layout = "NCHW"
    loader_workers = None  # CNTK's reader runs its own threads, with no setting for how many

    def __init__(self, spec: TaskSpec, run: RunOptions):
        self.workers = C.train.distributed.Communicator.num_workers() if run.devices > 1 else 1
        if self.workers != run.devices:
            raise Unsupported("CNTK's data-parallel learner runs one MPI process per device: launch the bench "
                              "with mpiexec -n N (here N = {}; this process has {} MPI worker(s))".format(
                                  run.devices, self.workers))
        self.rank = C.train.distributed.Communicator.rank() if self.workers > 1 else 0
        _seed(run)  # the same initial weights in every worker
        self.batch_size = run.batch_size  # per worker
        self.input_shape = run.input_shape
        self.num_labels = spec.num_classes
        self.features = C.input_variable(run.input_shape)
        self.labels = C.input_variable(spec.num_classes)
        self.model = _densenet121(self.features, spec.num_classes, run.batch_size)
        self.probabilities = C.sigmoid(self.model)
        # Sigmoid cross-entropy on the logits (softplus(z) - y z, stable), averaged over the
        # labels here and over the batch by the trainer.
        loss = C.reduce_mean(C.softplus(self.model) - self.labels * self.model, axis=0)
        learner = C.adam(self.model.parameters, lr=run.learning_rate, momentum=0.9, variance_momentum=0.999,
                         epsilon=1e-8, unit_gain=True, **_learner_options())
        if self.workers > 1:
            # The aggregated gradient is averaged over the global batch (IGNORE, above) and the
            # learning rate is already scaled by the devices.
            learner = C.train.distributed.data_parallel_distributed_learner(learner)
        self.trainer = C.Trainer(self.model, loss, [learner])

    def parameter_count(self) -> int:
        return _parameter_count(self.model)

    def train_step(self, images: Union[np.ndarray, WorkerShard], labels: Optional[np.ndarray]) -> None:
        """One step on a global batch: this worker trains on its share, which its reader
        decoded alone (a WorkerShard) or which it takes from the global batch's arrays."""
        if isinstance(images, WorkerShard):
            images, labels = images
        else:
            share = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            images, labels = images[share], labels[share]
        self.trainer.train_minibatch({self.features: np.ascontiguousarray(images),
                                      self.labels: np.asarray(labels, dtype=np.float32)})

    def loss(self) -> float:
        return float(self.trainer.previous_minibatch_loss_average)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.probabilities.eval({self.features: images})

    def input_pipeline(self, files: ImageFiles, stored_size: int, batch_size: int, training: bool,
                       seed: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Global batches from CNTK's own reader: a MinibatchSource over an ImageDeserializer
        (OpenCV decoding and transforms, on its own threads) composed with a CTFDeserializer
        for the 14-long label rows, joined by sequence key (the example's index, written in
        both files).

        CNTK's transforms crop first and scale last (the scale defines the output size): the
        crop takes input/stored of the image's side, then the scale brings it to the input
        size, bilinear. For square images (ChestX-ray14's are 1024×1024) this is
        resize-to-stored-then-crop up to interpolation. Random crops ('randomside') also flip
        horizontally with probability 1/2 (CNTK couples the two); evaluation takes the centre.
        In a data-parallel run, every MPI worker's reader (same randomisation seed) decodes only
        its partition of each global batch, as CNTK's distributed training reads: training
        yields (WorkerShard, None) for train_step."""
        folder = tempfile.mkdtemp(prefix="cntk-xray-")
        try:
            image_map = os.path.join(folder, "images.txt")
            label_file = os.path.join(folder, "labels.ctf")
            with open(image_map, "w") as images, open(label_file, "w") as labels:
                for key, (path, row) in enumerate(zip(files.paths, files.labels)):
                    images.write("{}\t{}\t0\n".format(key, path))  # key, path, (unused) class
                    labels.write("{} |labels {}\n".format(key, " ".join("{:g}".format(value) for value in row)))
            size = self.input_shape[-1]
            channels = self.input_shape[0]
            transforms = [
                C.io.transforms.crop(crop_type="randomside" if training else "center", side_ratio=size / stored_size),
                C.io.transforms.scale(width=size, height=size, channels=channels, interpolations="linear"),
            ]
            source = C.io.MinibatchSource(
                [C.io.ImageDeserializer(image_map, C.io.StreamDefs(
                    images=C.io.StreamDef(field="image", transforms=transforms))),
                 C.io.CTFDeserializer(label_file, C.io.StreamDefs(
                     labels=C.io.StreamDef(field="labels", shape=self.num_labels, is_sparse=False)))],
                randomize=training, randomization_seed=seed, max_sweeps=1)
            partitioned = training and self.workers > 1
            while True:
                # Minibatches stay on the host: they become numpy arrays here. Partitioned: this
                # worker's share of the global batch of batch_size samples.
                minibatch = source.next_minibatch(
                    batch_size, device=C.device.cpu(), num_data_partitions=self.workers if partitioned else 1,
                    partition_index=self.rank if partitioned else 0)
                if not minibatch:
                    return
                count = minibatch[source.streams.images].num_samples
                if training and count < batch_size // (self.workers if partitioned else 1):
                    return  # the last partial batch is dropped when training
                # OpenCV decodes to BGR in 0..255: RGB in [0, 1], NCHW.
                x = minibatch[source.streams.images].asarray().reshape((count,) + tuple(self.input_shape))
                x = np.ascontiguousarray(x[:, ::-1], dtype=np.float32) * np.float32(1.0 / 255.0)
                y = np.asarray(minibatch[source.streams.labels].asarray().reshape(count, self.num_labels),
                               dtype=np.float32)
                yield (WorkerShard(x, y), None) if partitioned else (x, y)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


TASKS = {"cnn_cifar10": CnnCifar10, "resnet50_inference": Resnet50Inference, "gru_imdb": GruImdb,
         "densenet121_xray": Densenet121Xray}
