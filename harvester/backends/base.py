"""The interface every model backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from harvester.stats import StatsSpec
from harvester.windows import Window


class Backend(ABC):
    """A loaded model that turns windows into per-group neuron statistics."""

    n_layers: int
    width: int

    @abstractmethod
    def statistics(self, windows: list[Window], spec: StatsSpec, batch_size: int,
                   pooling: str = "token") -> dict[int, dict[str, np.ndarray]]:
        """Forward every window once; return ``{group: {"tokens": int, "active": [L, I], ...}}``.

        ``pooling`` ``last``/``mean``: each document segment (a run of one group in a window) is one
        sample, its last token's or its mean activation; ``tokens`` then counts samples.
        """

    def close(self) -> None:
        """Release what the backend started (engines, worker processes); the default holds nothing."""
