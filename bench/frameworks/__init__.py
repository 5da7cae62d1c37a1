"""One module per framework, each with the same names in the same order:

    describe(device)        -> what the framework reports about itself (version, threads, CUDA, cuDNN)
    configure(device, seed) -> seeds and performance switches (autotuner, threads)
    class CnnCifar10        -> the seed's CNN: layout (NCHW or NHWC), parameter_count,
                               train_step, loss (waits for the device), predict
    TASKS                   -> task name -> implementation class

Put two of them side by side and only the framework differs.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..specs import FRAMEWORKS


def load(name: str) -> ModuleType:
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}; known: {', '.join(FRAMEWORKS)}")
    return importlib.import_module(f"{__name__}.{name}")
