"""Harvest workers: tokenization of a corpus stream, and model workers that turn token shards into
statistics in the store.

Used directly in-process (``--no-ray``) and wrapped as Ray tasks and actors by
:mod:`harvester.driver`; nothing here imports Ray.
"""

from __future__ import annotations

import functools
import os
import signal
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from harvester.backends import backend_class
from harvester.corpus import CorpusOptions, parse_corpora
from harvester.errors import naming_files
from harvester.stats import StatsSpec
from harvester.store import Store
from harvester.windows import ShardInfo, TokenSettings, load_shard, tokenize_stream

FAULT_ENV = "LSN_FAULT_INJECT"
"""Fault injection for tests: ``SHARD:MARKER`` -- the worker that first runs shard ``SHARD`` writes
garbage into part of the shard's rows and kills its own process (SIGKILL, as the kernel's OOM killer
does); ``MARKER`` (a file it creates) makes the fault happen once."""


@dataclass(frozen=True)
class TokenizeJob:
    """What a tokenization task needs, small enough to ship to any node."""

    model: str
    corpus: tuple[str, ...]
    options: CorpusOptions
    settings: TokenSettings
    root: str


def tokenize(job: TokenizeJob, stream: int) -> Iterator[ShardInfo]:
    """Tokenize one corpus stream into token shards; yields each shard as it is written."""
    tokenizer, corpora = _prepared(job)
    with naming_files(job.root):
        yield from tokenize_stream(corpora, stream, tokenizer, job.settings, job.root)


@functools.lru_cache(maxsize=2)
def _prepared(job: TokenizeJob):
    """The job's tokenizer and checked corpora, once per process: every stream of a harvest (and every
    task a Ray worker process runs) shares them instead of reloading and re-reading all inputs."""
    from harvester.backends.hf import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(job.model))
    return tokenizer, parse_corpora(list(job.corpus), job.options, tokenizer)


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
    unit: str = "mlp"
    pooling: str = "token"
    tensor_parallel: int = 1
    """vLLM: ranks per model."""
    seq_len: int = 512
    """vLLM: ``max_model_len`` (no window is longer)."""
    vllm_memory: str | None = None
    """vLLM: ``--vllm-memory`` (None: derived on CPU, vLLM's default on GPUs)."""


class ShardWorker:
    def __init__(self, cfg: WorkerConfig):
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        extra = {}
        if cfg.backend == "vllm":
            extra = dict(tensor_parallel=cfg.tensor_parallel, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                         memory=cfg.vllm_memory)
        self.backend = backend_class(cfg.backend)(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                                  device_map=cfg.device_map, site=cfg.site, unit=cfg.unit, **extra)
        self._store: Store | None = None

    def close(self) -> None:
        self.backend.close()

    def shape(self) -> tuple[int, int]:
        """``(layers, units per layer)`` of the loaded model."""
        return self.backend.n_layers, self.backend.width

    def run(self, info: ShardInfo) -> int:
        """Harvest one token shard into the store; returns its token count."""
        shard = load_shard(info)
        result = self.backend.statistics(shard.windows, self.cfg.spec, self.cfg.batch_size, self.cfg.pooling)
        if self._store is None:
            self._store = Store(self.cfg.store)
        _maybe_fail(self._store, info.index)
        with naming_files(self.cfg.store):
            self._store.write_shard(shard.index, result)
        return info.n_tokens


def _maybe_fail(store: Store, index: int) -> None:
    fault = os.environ.get(FAULT_ENV)
    if not fault:
        return
    shard, _, marker = fault.partition(":")
    if int(shard) != index or os.path.exists(marker):
        return
    open(marker, "w").close()
    var = store.variables[0]
    store.root[f"shards/{var}"][index, 0] = np.full(store.root[f"shards/{var}"].shape[2:], 7)  # a torn write
    os.kill(os.getpid(), signal.SIGKILL)
