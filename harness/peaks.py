"""Peak arithmetic of common GPUs (harness/gpu_peaks.yml), so that every achieved TFLOP/s can
be shown as a fraction of what the device can do at the cell's precision."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from .gpus import names_model
from .matrix import load_yaml

PEAKS_PATH = Path(__file__).with_name("gpu_peaks.yml")


class GpuPeak(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str = Field(min_length=1)
    fp32: float = Field(gt=0)
    tf32: Optional[float] = Field(None, gt=0)
    fp16: Optional[float] = Field(None, gt=0)
    bf16: Optional[float] = Field(None, gt=0)
    source: str = Field(min_length=1)


class PeakTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    gpus: list[GpuPeak]

    def peak(self, gpu_name: str, precision: str) -> float | None:
        """TFLOP/s of the first entry naming ``gpu_name`` at ``precision``, or None."""
        for entry in self.gpus:
            if names_model(entry.model, gpu_name):
                return getattr(entry, precision, None)
        return None


@functools.cache
def load_peaks(path: Path = PEAKS_PATH) -> PeakTable:
    return load_yaml(path, PeakTable)[0]
