"""One module per framework, each with the same names in the same order:

    describe(device)        -> what the framework reports about itself (version, threads, CUDA, cuDNN)
    configure(device, seed, threads) -> seeds and performance switches (autotuner, thread pools)
    class CnnCifar10        -> the seed's CNN: layout (NCHW or NHWC), parameter_count,
                               train_step, loss (waits for the device), predict
    TASKS                   -> task name -> implementation class

Put two of them side by side and only the framework differs.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from ..specs import FRAMEWORKS

# One Keras module serves every backend; Keras reads the backend at import time.
KERAS_BACKENDS = {"keras-tensorflow": "tensorflow", "keras-jax": "jax", "keras-torch": "torch"}


def load(name: str) -> ModuleType:
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}; known: {', '.join(FRAMEWORKS)}")
    if name in KERAS_BACKENDS:
        os.environ["KERAS_BACKEND"] = KERAS_BACKENDS[name]
        name = "keras"
    return importlib.import_module(f"{__name__}.{name}")
