"""Model backends behind one interface, registered as lazy ``"module:Class"`` strings so that
importing the package never imports a backend's heavy dependencies."""

from __future__ import annotations

import importlib

from harvester.errors import HarvestError

BACKENDS = {"hf": "harvester.backends.hf:HFBackend", "vllm": "harvester.backends.vllm_engine:VLLMBackend"}


def backend_class(name: str):
    if name not in BACKENDS:
        raise HarvestError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
