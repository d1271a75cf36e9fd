"""Where a command's model runs: the device and dtype (``auto`` resolved from what this machine has),
and whether Ray is worth starting.

:func:`resolve` is the whole decision, from explicit capabilities (tested on any machine);
:func:`probe` reads them from torch; :func:`resolve_here` joins the two. Torch is imported only there.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Literal, get_args

from harvester.errors import HarvestError

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
DTYPES = get_args(Dtype)
_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(:\d+)?")


@dataclass(frozen=True)
class Capabilities:
    """What this machine's torch can run on."""

    cuda_built: bool = False
    """torch was built with CUDA (a CPU build cannot use a GPU at all)."""
    cuda_devices: int = 0
    """CUDA GPUs visible to this process."""
    bf16_supported: bool = False
    """The first visible GPU computes in bfloat16."""
    mps_available: bool = False


def resolve(device: str, dtype: str, caps: Capabilities = Capabilities(), *, check: bool = True) -> tuple[str, str]:
    """``(device, dtype)`` with ``auto`` decided by ``caps``; an impossible device is a :class:`HarvestError`.
    ``check=False`` (a Ray cluster to join, whose nodes are not this machine) checks only the spelling."""
    match = _DEVICE.fullmatch(device)
    if not match or (match.group(2) and match.group(1) != "cuda"):
        hint = " (a GPU is --device cuda)" if device.lower() == "gpu" else ""
        raise HarvestError(f"unknown --device '{device}'{hint}; choose {_device_help()}")
    if dtype not in DTYPES:
        raise HarvestError(f"unknown --dtype '{dtype}'; choose {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if caps.cuda_devices > 0 else "cpu"
    elif check:
        _check_device(device, caps)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and caps.bf16_supported else "float32"
    return device, dtype


def _check_device(device: str, caps: Capabilities) -> None:
    if device.startswith("cuda"):
        if not caps.cuda_built:
            raise HarvestError(f"--device {device}: this torch is a CPU-only build; install a CUDA build of "
                               "torch, or use --device cpu")
        if caps.cuda_devices == 0:
            raise HarvestError(f"--device {device}: no CUDA GPU is visible (check the driver and "
                               "CUDA_VISIBLE_DEVICES), or use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= caps.cuda_devices:
            raise HarvestError(f"--device {device}: only {caps.cuda_devices} GPU(s) are visible "
                               f"(cuda:0 to cuda:{caps.cuda_devices - 1})")
    elif device == "mps" and not caps.mps_available:
        raise HarvestError("--device mps: Apple's MPS backend is not available here; use --device cpu")


def probe() -> Capabilities:
    """This process's capabilities, from torch (no CUDA context is created for the count)."""
    import torch

    built = torch.backends.cuda.is_built()
    count = torch.cuda.device_count() if built else 0
    return Capabilities(cuda_built=built, cuda_devices=count,
                        bf16_supported=count > 0 and torch.cuda.is_bf16_supported(),
                        mps_available=torch.backends.mps.is_available())


def resolve_here(device: str, dtype: str, *, use_ray: bool = False, address: str | None = None) -> tuple[str, str]:
    """:func:`resolve` on this machine. A command that joins a Ray cluster (``use_ray`` and
    :func:`joins_cluster`) leaves explicit devices to the cluster to check; ``auto`` is still decided here."""
    return resolve(device, dtype, probe(), check=not (use_ray and joins_cluster(address)))


def joins_cluster(address: str | None) -> bool:
    """Whether a command's Ray work goes to a cluster rather than this machine: ``--address``,
    ``$RAY_ADDRESS``, or a Ray instance this process has already joined (which it then uses)."""
    ray = sys.modules.get("ray")  # never imported here just to ask
    return bool(address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()))


def wants_ray(device: str, actors: int | None, address: str | None, tensor_parallel: int = 1) -> bool:
    """Ray buys something only on a cluster, with several model actors, or for vLLM's ranks on GPUs
    (a placement group); one local actor runs in this process, without Ray's start-up (25-35 s)."""
    if joins_cluster(address):
        return True
    on_gpu = device.startswith("cuda")
    if on_gpu and tensor_parallel > 1:
        return True
    return (actors or (probe().cuda_devices if on_gpu else 1)) > 1


def start_line(device: str, dtype: str, on_ray: bool) -> str:
    """The one line a command prints when its model work starts (after its inputs were checked)."""
    return f"lsn: device {device}, dtype {dtype}, {'on Ray' if on_ray else 'in this process'}"


@dataclass(kw_only=True)
class DeviceOptions:
    """``--device`` and ``--dtype``, the same for every command that loads a model."""

    device: str = "auto"
    """auto (cuda when a GPU is visible, else cpu) | cpu | cuda | cuda:N | mps"""
    dtype: Dtype = "auto"
    """auto (bfloat16 on a GPU that supports it, else float32) | float32 | float16 | bfloat16"""


def _device_help() -> str:
    from harvester.options import field_docs

    return field_docs(DeviceOptions)["device"]
