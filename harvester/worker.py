"""One harvest worker: loads the model once, turns shards into statistics, writes them to the store.

Used directly in-process (``--no-ray``) and wrapped as a Ray actor by :mod:`harvester.driver`;
it imports no Ray itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from harvester.backends import backend_class
from harvester.stats import StatsSpec
from harvester.store import Store
from harvester.windows import Shard


@dataclass(frozen=True)
class WorkerConfig:
    backend: str
    model: str
    dtype: str
    device: str
    device_map: str | None
    site: str | None
    store: str
    spec: StatsSpec
    batch_size: int
    threads: int | None = None


class ShardWorker:
    def __init__(self, cfg: WorkerConfig):
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.backend = backend_class(cfg.backend)(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                                  device_map=cfg.device_map, site=cfg.site)
        self._store: Store | None = None

    def shape(self) -> tuple[int, int]:
        """``(layers, neurons per layer)`` of the loaded model."""
        return self.backend.n_layers, self.backend.width

    def run(self, shard: Shard) -> int:
        """Harvest one shard into the store; returns its token count."""
        result = self.backend.statistics(shard.windows, self.cfg.spec, self.cfg.batch_size)
        if self._store is None:
            self._store = Store(self.cfg.store)
        self._store.write_shard(shard.index, result)
        return shard.n_tokens
