"""Model backends behind one interface, registered as lazy ``"module:Class"`` strings so that
importing the package never imports a backend's heavy dependencies.

A name that is not registered but has the form ``package.module:Class`` names a backend class of
your own (a :class:`~harvester.backends.base.Backend`); the tests and the pipeline benchmark use this
for a null backend. It must be importable wherever the workers run (on a Ray cluster: on every node).
"""

from __future__ import annotations

import importlib

from harvester.errors import HarvestError

BACKENDS = {"hf": "harvester.backends.hf:HFBackend", "vllm": "harvester.backends.vllm_engine:VLLMBackend"}


def backend_class(name: str):
    target = BACKENDS.get(name, name if ":" in name else None)
    if target is None:
        raise HarvestError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)} (or module:Class)")
    module, _, cls = target.partition(":")
    try:
        found = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        if name in BACKENDS:
            raise
        raise HarvestError(f"cannot load backend '{name}': {err}") from None
    from harvester.backends.base import Backend

    if not (isinstance(found, type) and issubclass(found, Backend)):
        raise HarvestError(f"backend '{name}' is not a harvester.backends.base.Backend")
    return found
