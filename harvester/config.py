"""The resolved settings of one harvest."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from harvester import fs
from harvester.corpus import CorpusOptions
from harvester.errors import HarvestError


@dataclass
class HarvestConfig:
    model: str
    """Local path, hub id, or ``tiny:ARCH`` (a built-in random model)."""
    corpus: list[str] | str
    """Corpus specs (see :mod:`harvester.corpus`); several are harvested together."""
    store: str
    """Zarr store directory or fsspec URL; created, or resumed if it holds this same harvest."""
    corpus_options: CorpusOptions = field(default_factory=CorpusOptions)
    backend: str = "hf"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """``auto``: bfloat16 on a GPU that supports it, else float32 (resolved here, before the store's
    fingerprint records it, so that a resumed run matches)."""
    device: str = "auto"
    """``auto`` (cuda when a GPU is visible, else cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; each Ray
    actor takes one GPU when this is cuda. Checked on this machine unless a Ray cluster is joined."""
    device_map: str | None = None
    """Passed to ``from_pretrained`` (``auto`` spreads a large model over the visible GPUs)."""
    seq_len: int = 512
    batch_size: int = 8
    shard_tokens: int = 1 << 20
    """Tokens per shard: the unit of work, of resume and of storage."""
    actors: int | None = None
    """Model actors (default: one per GPU, or 1 on CPU); one on this machine runs in this process, without Ray."""
    address: str | None = None
    """Ray cluster to join; default ``$RAY_ADDRESS``, else (with several actors) an embedded local instance."""
    use_ray: bool = True
    """False: run the worker in this process. True uses Ray only where it buys something (a cluster,
    several actors, vLLM ranks on GPUs; :func:`harvester.devices.wants_ray`)."""
    stats: tuple[str, ...] = ("active", "sum", "sqsum")
    hist_edges: tuple[float, ...] | None = None
    site: str | None = None
    """Override the hooked module, e.g. ``model.layers.{layer}.mlp.act_fn``."""
    unit: str = "mlp"
    """``mlp`` neurons, or ``residual``: the transformer blocks' outputs."""
    tensor_parallel: int = 1
    """vLLM backend: GPUs (ranks) per model; each rank holds a contiguous slice of the neurons."""
    vllm_memory: str | None = None
    """vLLM backend: its memory reservation, GiB of KV cache or N% of the device (see ``lsn harvest --help``)."""
    tokenize_tasks: int | None = None
    """Concurrent tokenization tasks (default: the CPUs the model actors leave free, at least 1)."""
    progress: bool = True
    overwrite: bool = False
    """Discard an existing store at ``store`` (once every up-front check passed) instead of resuming it."""

    def __post_init__(self):
        from harvester.devices import resolve_here

        if not fs.is_url(str(self.store)):  # one path however it was written (".", "..", relative)
            self.store = os.path.abspath(self.store)
        self._check_device_map()
        self.device, self.dtype = resolve_here(self.device, self.dtype, use_ray=self.use_ray, address=self.address)
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        self.corpus = list(self.corpus)
        if not self.corpus:
            raise HarvestError("no corpus given: --corpus SPEC (repeatable)")
        if self.tokenize_tasks is not None and self.tokenize_tasks <= 0:
            raise HarvestError(f"--tokenize-tasks must be positive, got {self.tokenize_tasks}")
        for name in ("seq_len", "batch_size", "shard_tokens", "tensor_parallel"):
            if getattr(self, name) <= 0:
                raise HarvestError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.tensor_parallel > 1 and self.backend != "vllm":
            raise HarvestError("--tensor-parallel needs --backend vllm (the hf backend spreads a model with --device-map)")
        if self.backend == "vllm" and self.corpus_options.pooling != "token":
            raise HarvestError(f"--pooling {self.corpus_options.pooling} needs --backend hf; the vLLM backend counts tokens")
        if self.vllm_memory is not None:
            if self.backend != "vllm":
                raise HarvestError("--vllm-memory is for --backend vllm")
            from harvester.backends.vllm_start import parse_memory

            parse_memory(self.vllm_memory)
        if self.actors is not None and self.actors <= 0:
            raise HarvestError(f"--actors must be positive, got {self.actors}")
        if self.device_map and self.use_ray and (self.actors or 1) > 1:
            raise HarvestError("--device-map spreads one model over all GPUs: use it with --actors 1")

    def _check_device_map(self) -> None:
        """``--device-map``: a placement transformers knows, and only for the hf backend (checked before
        any store exists or is discarded)."""
        if self.device_map is None:
            return
        if self.backend != "hf":
            raise HarvestError("--device-map is for the hf backend; the vLLM backend spreads a model with "
                               "--tensor-parallel")
        if self.device_map not in DEVICE_MAPS:
            raise HarvestError(f"--device-map {self.device_map!r} is not one of {', '.join(DEVICE_MAPS)}")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""The ``device_map`` strategies ``from_pretrained`` accepts by name."""
