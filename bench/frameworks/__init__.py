"""One module per framework, each with the same names in the same order:

    describe(run)       -> what the framework reports about itself (version, threads, CUDA, cuDNN)
    configure(run)      -> seeds and performance switches (autotuner, thread pools, CPU devices)
    device_memory_peak(run) -> the allocator's peak device memory, where it keeps one
    gemm(size, run)     -> a function computing one size × size matrix product (bench/ceiling.py)
    class CnnCifar10    -> the seed's CNN
    class Resnet50Inference -> ResNet-50 v1.5 feature extractor
    class GruImdb       -> the seed's GRU classifier
    class Densenet121Xray -> DenseNet-121, 14 labels, data-parallel over run.devices
    TASKS               -> task name -> implementation class

``run`` is a bench.specs.RunOptions; each class is built as ``Class(spec, run)`` and offers
what bench/protocol.py lists. Put two modules side by side and only the framework differs.
"""
import importlib
import os
from types import ModuleType

from ..specs import FRAMEWORKS

# One Keras module serves every backend; Keras reads the backend at import time.
KERAS_BACKENDS = {"keras-tensorflow": "tensorflow", "keras-jax": "jax", "keras-torch": "torch"}


def load(name: str) -> ModuleType:
    if name not in FRAMEWORKS:
        raise ValueError("unknown framework {!r}; known: {}".format(name, ", ".join(FRAMEWORKS)))
    if name in KERAS_BACKENDS:
        os.environ["KERAS_BACKEND"] = KERAS_BACKENDS[name]
        name = "keras"
    return importlib.import_module("{}.{}".format(__name__, name))
