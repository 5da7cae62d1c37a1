"""PNG charts: matplotlib without a display, each figure laid out, written and closed."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display
import matplotlib.pyplot as plt  # noqa: E402


def save(figure: plt.Figure, path: Path) -> Path:
    """Write the figure to ``path`` (its folder made) and free it."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
