"""A test-only backend: statistics of the model's shape at no cost (no weights, no forward pass).

``backend="tests.null_backend:NullBackend"`` runs the whole harvest path (corpus, tokenization,
token shards, dispatch to workers, store writes, reduction) with the model replaced, so that
``benchmarks/pipeline_capacity.py`` measures what surrounds the model. Only the model's config is
read; each statistic is one fixed array of the right shape and dtype (random values, made once, so
the store compresses them as it would real counts and sums), and ``tokens`` is the true count of
each group's tokens in the windows.
"""

from __future__ import annotations

import numpy as np

from harvester.backends.base import Backend
from harvester.backends.hf import load_config, resolve_model
from harvester.stats import VARIABLES, StatsSpec


class NullBackend(Backend):
    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu", device_map=None,
                 site=None, unit: str = "mlp", **_):
        config = load_config(resolve_model(model))
        self.n_layers = config.num_hidden_layers
        self.width = config.intermediate_size if unit == "mlp" else config.hidden_size
        self._payload: dict[tuple, dict[str, np.ndarray]] = {}

    def _values(self, spec: StatsSpec) -> dict[str, np.ndarray]:
        key = (spec.stats, spec.n_bins if "hist" in spec.stats else 0)
        if key not in self._payload:
            rng = np.random.default_rng(0)
            shape = (self.n_layers, self.width)
            values = {}
            for stat in spec.stats:
                var = VARIABLES[stat]
                if stat == "hist":
                    values[var] = rng.integers(0, 1 << 16, size=(*shape, spec.n_bins), dtype=np.int64)
                elif stat == "active":
                    values[var] = rng.integers(0, 1 << 20, size=shape, dtype=np.int64)
                else:
                    values[var] = rng.standard_normal(shape) * (1 << 10)
            self._payload[key] = values
        return self._payload[key]

    def statistics(self, windows, spec: StatsSpec, batch_size: int, pooling: str = "token") -> dict:
        groups = np.concatenate([w.groups for w in windows]) if windows else np.zeros(0, np.int16)
        counts = np.bincount(groups[groups >= 0].astype(np.int64))
        values = self._values(spec)
        return {int(g): {"tokens": int(n), **values} for g, n in enumerate(counts) if n > 0}
