"""Per-neuron statistics, accumulated per token group, layer and neuron.

On CPU, the one-pass kernel of :mod:`harvester.cpu_kernel` reads each token's activation row once and
adds it to its group's accumulators, with no temporaries. On other devices (and with
``kernel="matmul"``) the token group ids ``[T]`` (``-1`` = padding, never counted) of a forward pass
become a one-hot matrix ``W [g, T]`` over the ``g`` groups present, and each statistic is one matrix
product ``W @ X`` with ``X [T, I]`` the activation (or a function of it). On CUDA the HF backend
can use the fused Triton kernel of :mod:`harvester.fused` instead.

Exactness:
- ``tokens``, ``active`` (activation > 0) and ``nonzero`` (activation != 0, opt-in: the Aya study's
  count) are exact integers: a float32 sum of 0/1 values is exact
  below 2**24 terms, and one forward pass holds far fewer tokens; totals accumulate in int64.
- ``act_sum``, ``act_sqsum`` and ``act_abssum`` (sum of ``|x|``, for t-tests on absolute values) are
  accumulated in float64. The CPU kernel adds every token in float64; the matrix products sum one
  forward pass (at most ``batch_size * seq_len`` tokens) in float32 and add that in float64.
- ``hist`` counts values per bin of fixed edges ``e``: bin 0 is ``x < e[0]``, bin ``j`` is
  ``e[j-1] <= x < e[j]``, the last bin is ``x >= e[-1]``; NaN counts in the last bin. On per-neuron
  ranges (DLN, ``--hist-edges from-store:STORE:BINS``; :func:`dln_ranges`) each neuron has its own
  ``lo`` and width ``w`` (float32): ``bin = floor((x - lo) / w) + 1`` clamped to ``[0, BINS + 1]``, in
  float32 with ``torch.div(..., rounding_mode="floor")`` semantics (bin 0 underflow, ``BINS + 1``
  overflow); NaN and +inf count in the overflow bin, -inf in the underflow bin.
- ``batch_quantile`` (opt-in, Mondal et al.'s ``mean_p90_act``): per forward pass that is a full
  batch (``batch_shape`` windows x tokens, no padding) of one group, ``torch.quantile`` of each
  neuron's activations over the pass's tokens (float32), added in float64 to ``quantile_sum``, and 1
  added to ``quantile_batches``; the mean over batches is their ratio. A short pass (a stream's or a
  shard's last batch) is not counted, as the paper's loader drops its last batch; a pass that mixes
  groups is an error.
- ``above`` (opt-in): tokens whose activation exceeds their group's threshold (``thresholds``, compared
  in float32 as the paper's code compares a model's activation with its float32 threshold).
- A non-finite activation (an overflowed float16 model) makes its own group's sums inf or NaN on the
  CPU kernel and the fused kernel. In the matrix products it also makes every other group's sums in
  that forward pass NaN (``0 * inf``); counts and histograms stay exact on every path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from harvester.errors import HarvestError

STATS = ("active", "nonzero", "sum", "sqsum", "abs", "hist", "batch_quantile", "quantile_batches", "above")
"""Statistic names on the command line (``--stats``); ``quantile_batches`` comes with ``batch_quantile``."""

VARIABLES = {"active": "active", "nonzero": "nonzero", "sum": "act_sum", "sqsum": "act_sqsum", "abs": "act_abssum",
             "hist": "hist", "batch_quantile": "quantile_sum", "quantile_batches": "quantile_batches", "above": "above"}
"""Statistic name -> variable name in the store."""

BATCHWISE = ("batch_quantile", "quantile_batches", "above")
"""Statistics taken by :meth:`NeuronStats.update` in torch on every device (no CPU kernel, no fused
kernel): they need each pass's batch, or a threshold per group."""

_SHAPES = {"active": torch.int64, "nonzero": torch.int64, "sum": torch.float64, "sqsum": torch.float64,
           "abs": torch.float64, "hist": torch.int64, "batch_quantile": torch.float64, "quantile_batches": torch.int64,
           "above": torch.int64}

_MAX_TOKENS_PER_PASS = 1 << 24  # float32 counts stay exact below this

KERNELS = ("auto", "numba", "matmul")
"""How :class:`NeuronStats` reduces CPU activations."""


def _cpu_kernel(kernel: str):
    """The CPU kernel's entry point for ``kernel``, or None for the matrix-product path. ``auto``
    follows ``LSN_STATS_KERNEL`` when it is set."""
    if kernel == "auto" and os.environ.get("LSN_STATS_KERNEL"):
        kernel = os.environ["LSN_STATS_KERNEL"]
        if kernel not in KERNELS:
            raise HarvestError(f"LSN_STATS_KERNEL must be one of {', '.join(KERNELS)}, not '{kernel}'")
    if kernel == "matmul":
        return None
    try:
        from harvester.cpu_kernel import accumulate
    except Exception as err:  # noqa: BLE001 -- numba missing, or e.g. no writable cache directory
        if kernel == "numba":
            first = str(err).splitlines()[0] if str(err) else ""
            raise HarvestError(f"the numba statistics kernel is not available ({type(err).__name__}: {first}); "
                               "install numba, set NUMBA_CACHE_DIR to a writable directory, or use "
                               "LSN_STATS_KERNEL=matmul") from None
        return None
    return accumulate


def cpu_edges(spec: StatsSpec) -> tuple:
    """The histogram bins as the CPU kernel takes them: ``(float32 edges or None, 1 / spacing, lo, width)``
    with ``lo``, ``width`` the per-neuron ranges ``[L, I]`` (float32) or None."""
    if "hist" not in spec.stats:
        return None, 0.0, None, None
    if spec.hist_bins is not None:
        lo, width = spec.hist_ranges
        return None, 0.0, np.ascontiguousarray(lo, np.float32), np.ascontiguousarray(width, np.float32)
    from harvester.cpu_kernel import inverse_spacing

    edges = np.asarray(spec.hist_edges, np.float32)
    return edges, inverse_spacing(edges), None, None


def parse_stats(text: str) -> tuple[str, ...]:
    """``"active,sum"`` -> ``("active", "sum")`` in canonical order; ``active`` is always kept."""
    names = {s.strip() for s in text.split(",") if s.strip()}
    unknown = names - set(STATS)
    if unknown:
        raise HarvestError(f"unknown statistic(s) {', '.join(sorted(unknown))}; choose from {', '.join(STATS)}")
    names.add("active")
    if "batch_quantile" in names:
        names.add("quantile_batches")
    elif "quantile_batches" in names:
        raise HarvestError("quantile_batches comes with --stats ...,batch_quantile; it is not a statistic alone")
    return tuple(s for s in STATS if s in names)


def parse_edges(text: str) -> tuple[float, ...]:
    """``"lo:hi:n"`` -> ``n + 1`` evenly spaced edges, rounded so that round values (0) are exact."""
    try:
        lo, hi, n = text.split(":")
        lo, hi, n = float(lo), float(hi), int(n)
    except ValueError:
        raise HarvestError(f"--hist-edges must be LO:HI:BINS, e.g. -1:4:100, not '{text}'") from None
    if n <= 0 or not hi > lo:
        raise HarvestError(f"--hist-edges needs HI > LO and BINS > 0, got '{text}'")
    _check_bins(text, n)
    return tuple(float(v) for v in np.round(np.linspace(lo, hi, n + 1), 9))


MAX_HIST_BINS = 1 << 16
"""The most histogram bins ``--hist-edges`` takes: each group of a shard counts ``layers x units x bins``
int64 in memory (DLN's 400 bins: 1.5 GiB at Llama-3-8B's 32 x 14,336); :func:`check_hist_memory` then
checks the model's shape."""


def _check_bins(text: str, bins: int) -> None:
    if bins > MAX_HIST_BINS:
        raise HarvestError(f"--hist-edges {text}: BINS must be at most {MAX_HIST_BINS}, not {bins} (each group "
                           "counts layers x units x BINS int64 in memory)")


def check_hist_memory(layers: int, width: int, n_bins: int) -> None:
    """Refuse histogram counts of ``n_bins`` bins (under- and overflow included) at ``layers x width``
    when one group's alone (int64) would take more than this machine's memory."""
    need = layers * width * n_bins * 8
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf: nothing to check against
        return
    if need > have:
        raise HarvestError(f"--hist-edges: {n_bins} bins at {layers} layers x {width} units are "
                           f"{need / 2**30:.1f} GiB of counts for each group, more than this machine's "
                           f"{have / 2**30:.1f} GiB of memory; take fewer bins")


RANGE_PREFIX = "from-store:"
"""``--hist-edges from-store:STORE:BINS[:HI]``: per-neuron ranges from a first store (DLN)."""

RANGE_FLOOR, RANGE_FLAT, RANGE_HALF, RANGE_MIN_WIDTH = -0.4, 1e-3, 0.05, 1e-6
"""DLN's ``build_hist_cache.py``: the floor under the low end (``SILU_FLOOR_PAD``, below SiLU's minimum
-0.2785), the width under which a range is flat, the half-width such a range gets around the mean, and
the least bin width."""


@dataclass(frozen=True)
class RangeSource:
    """``--hist-edges from-store:STORE:BINS[:HI]``: ``BINS`` inner bins per neuron on ``[lo, hi]`` with
    ``lo = max(m - 3σ, -0.4)``, ``hi = m + HI·σ`` of the first store ``STORE``'s pooled moments."""

    store: str
    bins: int
    hi: float = 3.0


def parse_hist_edges(text: str) -> tuple[float, ...] | RangeSource:
    """``--hist-edges``: ``LO:HI:BINS`` (:func:`parse_edges`) or ``from-store:STORE:BINS[:HI]``. ``BINS``
    and ``HI`` are read from the right, so ``STORE`` may hold ':' (``s3://...``); a path that itself
    ends in ``:N`` needs ``HI`` written out."""
    if not text.startswith(RANGE_PREFIX):
        return parse_edges(text)
    usage = f"--hist-edges must be from-store:STORE:BINS[:HI], e.g. from-store:runs/first:400, not '{text}'"
    rest = text[len(RANGE_PREFIX):]
    parts = rest.rsplit(":", 2)
    if len(parts) == 3 and parts[0] and _integer(parts[1]) is not None and _integer(parts[2], float) is not None:
        store, bins, hi = parts[0], _integer(parts[1]), _integer(parts[2], float)
    else:
        store, _, bins = rest.rpartition(":")
        bins, hi = _integer(bins), 3.0
    if not store or bins is None:
        raise HarvestError(usage)
    if bins <= 0:
        raise HarvestError(f"--hist-edges {text}: BINS must be a positive integer, not {bins}")
    _check_bins(text, bins)
    if not (np.isfinite(hi) and hi > 0):
        raise HarvestError(f"--hist-edges {text}: HI (the range's upper end, in standard deviations above the "
                           f"mean) must be a positive number, not {hi:g}")
    return RangeSource(store, bins, hi)


def _integer(text: str, kind=int):
    """``text`` as an ``int`` (or ``float``), None if it is not one."""
    try:
        return kind(text)
    except ValueError:
        return None


def dln_ranges(mean: np.ndarray, std: np.ndarray, bins: int, hi: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron histogram ranges ``(lo, width)`` (float32, the shape of ``mean``) as DLN's
    ``build_hist_cache.py`` computes them in torch float32 from the pooled mean and standard deviation:
    ``lo = max(m - 3σ, -0.4)``, ``hi = m + HI·σ``; where ``hi - lo < 1e-3`` the range is ``m ± 0.05``;
    ``width = max((hi - lo) / bins, 1e-6)``."""
    f = np.float32
    m, s = np.asarray(mean, f), np.asarray(std, f)
    with np.errstate(over="ignore", invalid="ignore"):  # a huge HI overflows: the harvest refuses what is not finite
        lo = np.maximum(m - f(3.0) * s, f(RANGE_FLOOR))
        top = m + f(hi) * s
        flat = (top - lo) < f(RANGE_FLAT)
        lo = np.where(flat, m - f(RANGE_HALF), lo)
        top = np.where(flat, m + f(RANGE_HALF), top)
        return lo.astype(f), np.maximum((top - lo) / f(bins), f(RANGE_MIN_WIDTH)).astype(f)


def ranges_sha256(lo: np.ndarray, width: np.ndarray) -> str:
    """The digest of per-neuron ranges that the fingerprint records: their float32 bytes, lo then width."""
    import hashlib

    sha = hashlib.sha256(np.ascontiguousarray(lo, np.float32).tobytes())
    sha.update(np.ascontiguousarray(width, np.float32).tobytes())
    return sha.hexdigest()


@dataclass(frozen=True)
class StatsSpec:
    """Which statistics to accumulate."""

    stats: tuple[str, ...] = ("active", "sum", "sqsum")
    """Canonical subset of :data:`STATS`."""
    hist_edges: tuple[float, ...] | None = None
    """Histogram bin edges (ascending), required when ``hist`` is in ``stats``."""
    quantile: float | None = None
    """``batch_quantile``: the quantile taken per batch (0.9: Mondal et al.'s ``mean_p90_act``)."""
    batch_shape: tuple[int, int] | None = None
    """``batch_quantile``: ``(windows, tokens)`` of a full batch; only such passes are counted."""
    thresholds: np.ndarray | None = field(default=None, compare=False, repr=False)
    """``above``: float64 ``[group, layer, neuron]``, each group's threshold (rows by group id)."""
    hist_bins: int | None = None
    """``hist`` on per-neuron ranges: the inner bins (``BINS``; with the underflow and overflow bins
    ``BINS + 2`` in all); None with fixed ``hist_edges``."""
    hist_ranges: tuple | None = field(default=None, compare=False, repr=False)
    """``hist`` on per-neuron ranges: ``(lo, width)``, float32 ``[layer, neuron]`` (:func:`dln_ranges`)."""

    def __post_init__(self):
        if "hist" in self.stats and not self.hist_edges and self.hist_bins is None:
            raise HarvestError("the hist statistic needs bin edges")
        if self.hist_bins is not None and (self.hist_edges or self.hist_bins <= 0):
            raise HarvestError("the hist statistic takes fixed edges or per-neuron ranges of a positive number "
                               "of bins, not both")
        if self.hist_edges is not None and list(self.hist_edges) != sorted(set(self.hist_edges)):
            raise HarvestError("histogram edges must be strictly increasing")
        if "batch_quantile" in self.stats and not (self.quantile is not None and 0 < self.quantile < 1):
            raise HarvestError(f"the batch_quantile statistic needs a quantile in (0, 1), not {self.quantile}")

    def check_batchwise(self) -> None:
        """What taking ``batch_quantile`` or ``above`` needs beyond what a store records."""
        if "batch_quantile" in self.stats and not self.batch_shape:
            raise HarvestError("the batch_quantile statistic needs the batch shape (--batch-size x --seq-len)")
        if "above" in self.stats and self.thresholds is None:
            raise HarvestError("the above statistic needs thresholds: --thresholds-from STORE")
        if "hist" in self.stats and self.hist_bins is not None and self.hist_ranges is None:
            raise HarvestError("the hist statistic on per-neuron ranges needs the ranges: --hist-edges "
                               "from-store:STORE:BINS")

    @property
    def n_bins(self) -> int:
        if "hist" not in self.stats:
            return 0
        return self.hist_bins + 2 if self.hist_bins is not None else len(self.hist_edges) + 1


class NeuronStats:
    """Accumulators for one unit of work (a shard): ``{group: {variable: array [L, I(, B)]}}``.

    Call :meth:`begin` with the flattened group ids of a forward pass, then :meth:`update` from each
    layer's hook with that layer's activation ``[..., I]``. No activation tensor is kept.
    """

    def __init__(self, spec: StatsSpec, n_layers: int, width: int, device: str | torch.device = "cpu",
                 kernel: str = "auto"):
        """``kernel``: how CPU activations are reduced. ``"numba"``: the one-pass kernel of
        :mod:`harvester.cpu_kernel`; ``"matmul"``: one matrix product per statistic (the path for
        other devices); ``"auto"``: ``LSN_STATS_KERNEL`` when set, else numba when it imports."""
        if kernel not in KERNELS:
            raise HarvestError(f"unknown statistics kernel '{kernel}'; choose from {', '.join(KERNELS)}")
        spec.check_batchwise()
        self.spec, self.n_layers, self.width = spec, n_layers, width
        self.device = torch.device(device)
        self._accumulate = _cpu_kernel(kernel) if self.device.type == "cpu" else None
        self.kernel = "numba" if self._accumulate is not None else "matmul"
        """The path this instance takes for activations on its device: ``numba`` or ``matmul``."""
        self._edges = cpu_edges(spec) if self._accumulate is not None else None
        self.tokens: dict[int, int] = {}
        self._slot: dict[int, int] = {}  # group id -> row of the accumulators
        self._acc: dict[str, torch.Tensor] = {}
        self._pass: dict[torch.device, tuple] = {}  # per device: (W, slots, token slots, valid)
        self._buf: dict[tuple, torch.Tensor] = {}
        self._edges_on: dict[tuple, torch.Tensor] = {}  # the matrix path's histogram edges, per device
        self._ids: torch.Tensor | None = None

    def begin(self, group_ids: torch.Tensor) -> None:
        """Start a forward pass whose flattened tokens carry ``group_ids [T]`` (-1 = padding)."""
        ids = group_ids.reshape(-1).long()
        if ids.numel() >= _MAX_TOKENS_PER_PASS:
            raise HarvestError(f"a forward pass of {ids.numel()} tokens is too large; lower --batch-size")
        present = torch.unique(ids[ids >= 0]).tolist()
        for g in present:
            if g not in self._slot:
                self._add_slot(g)
        counts = torch.bincount(ids[ids >= 0], minlength=max(present, default=-1) + 1)
        for g in present:
            self.tokens[g] = self.tokens.get(g, 0) + int(counts[g])
        self._ids, self._present = ids, present
        self._full = self._full_batch(group_ids, present)
        self._pass.clear()
        self._positions: dict = {}
        self._rows = None  # the CPU kernel's per-token accumulator rows and accumulator arrays
        self._slots = None  # this pass's accumulator rows, in the order of its present groups

    def _full_batch(self, group_ids: torch.Tensor, present: list[int]) -> bool:
        """Whether ``batch_quantile`` counts this pass: ``batch_shape`` tokens, none of them padding, one
        group (a pass that mixes groups is refused: its quantile would be no group's)."""
        if "batch_quantile" not in self.spec.stats:
            return False
        if len(present) > 1:
            raise HarvestError(f"--stats batch_quantile needs each batch of windows from one group, but a batch "
                               f"holds {len(present)} (a corpus whose documents mix groups, e.g. prompt/response, "
                               "or several groups in one stream); harvest per-language streams (text:DIR, "
                               "wikipedia:...)")
        return tuple(group_ids.shape) == tuple(self.spec.batch_shape) and bool((group_ids >= 0).all())

    def _add_slot(self, group: int) -> None:
        self._slot[group] = len(self._slot)
        L, I = self.n_layers, self.width
        for name in self.spec.stats:
            shape = (L, I, self.spec.n_bins) if name == "hist" else (L, I)
            row = torch.zeros((1, *shape), dtype=_SHAPES[name], device=self.device)
            self._acc[name] = row if name not in self._acc else torch.cat([self._acc[name], row])

    def _pass_on(self, device: torch.device) -> tuple:
        """The one-hot matrix and slot indices of this pass, on the activation's device (cached)."""
        if device not in self._pass:
            ids = self._ids.to(device)
            groups = torch.tensor(self._present, device=device)
            onehot = (ids[None, :] == groups[:, None]).to(torch.float32)  # [g, T]
            slots = self._pass_slots()
            valid = ids >= 0
            token_slot = self.positions(device)[valid] if "hist" in self.spec.stats else None
            self._pass[device] = (onehot, slots, token_slot, valid)
        return self._pass[device]

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, tuple(like.shape))
        if key not in self._buf:
            self._buf.clear()
            self._buf[key] = torch.empty_like(like, dtype=torch.float32)
        return self._buf[key]

    def update(self, layer: int, act: torch.Tensor) -> None:
        """Add one layer's activation ``[..., I]`` of the current pass to the accumulators."""
        x = act.detach().reshape(-1, act.shape[-1])  # [T, I]
        if x.shape != (self._ids.numel(), self.width):
            raise HarvestError(
                f"layer {layer}: activation of shape {tuple(act.shape)} does not match "
                f"{self._ids.numel()} tokens x {self.width} neurons"
            )
        if not self._present:
            return
        if x.dtype != torch.float32:
            x = x.float()
        if self._accumulate is not None and x.device.type == "cpu":
            self._update_cpu(layer, x)
        else:
            self._update_matmul(layer, x)
        if "batch_quantile" in self.spec.stats and self._full:
            self._add_batch_quantile(layer, x)
        if "above" in self.spec.stats:
            self._add_above(layer, x)

    def _update_matmul(self, layer: int, x: torch.Tensor) -> None:
        """The core statistics as one matrix product each (the path for devices other than the CPU)."""
        onehot, slots, token_slot, valid = self._pass_on(x.device)
        stats = self.spec.stats
        buf = self._buffer(x)
        torch.gt(x, 0, out=buf)
        self._add("active", layer, slots, (onehot @ buf).round_().to(torch.int64))
        if "nonzero" in stats:
            torch.ne(x, 0, out=buf)
            self._add("nonzero", layer, slots, (onehot @ buf).round_().to(torch.int64))
        if "sum" in stats:
            self._add("sum", layer, slots, (onehot @ x).double())
        if "sqsum" in stats:
            torch.mul(x, x, out=buf)
            self._add("sqsum", layer, slots, (onehot @ buf).double())
        if "abs" in stats:
            torch.abs(x, out=buf)
            self._add("abs", layer, slots, (onehot @ buf).double())
        if "hist" in stats:
            self._add("hist", layer, slots, self._histogram(x[valid], token_slot, len(self._present), layer))

    def _add_batch_quantile(self, layer: int, x: torch.Tensor) -> None:
        """This full batch's quantile of each neuron over its ``[T, I]`` tokens, and one batch more."""
        slots = self._pass_slots()
        q = torch.quantile(x, self.spec.quantile, dim=0)  # [I], float32 as the paper takes it
        self._add("batch_quantile", layer, slots, q[None].double())
        self._add("quantile_batches", layer, slots, torch.ones((1, self.width), dtype=torch.int64))

    def _add_above(self, layer: int, x: torch.Tensor) -> None:
        """Per present group, its tokens whose activation exceeds the group's threshold ``[I]``."""
        key = ("thresholds", x.device)
        if key not in self._edges_on:
            self._edges_on[key] = torch.as_tensor(self.spec.thresholds, dtype=torch.float32, device=x.device)
        thresholds, ids = self._edges_on[key], self._ids.to(x.device)
        counts = torch.stack([(x[ids == g] > thresholds[g, layer]).sum(dim=0) for g in self._present])
        self._add("above", layer, self._pass_slots(), counts.to(torch.int64))

    def _update_cpu(self, layer: int, x: torch.Tensor) -> None:
        """One pass of the numba kernel straight into the accumulators (no temporaries)."""
        if self._rows is None:  # each token's accumulator row (-1: padding), from its place among the groups
            place = self.positions(x.device).numpy()
            rows = np.where(place >= 0, self._pass_slots().numpy()[place], -1)
            self._rows = (rows, {name: acc.numpy() for name, acc in self._acc.items()})
        rows, acc = self._rows
        self._accumulate(x.contiguous().numpy(), rows, layer, acc, *self._edges)

    @property
    def n_present(self) -> int:
        """Groups present in this pass."""
        return len(self._present)

    def positions(self, device: torch.device) -> torch.Tensor:
        """Each token's position in this pass's present groups (0..g-1), -1 for padding (any negative
        id): the group ids the fused kernel takes, and the rows of the matrix path's histogram and of
        the CPU kernel."""
        if device not in self._positions:
            ids = self._ids.to(device)
            groups = torch.tensor(self._present, device=device, dtype=ids.dtype)
            out = torch.full_like(ids, -1)
            valid = ids >= 0
            out[valid] = torch.searchsorted(groups, ids[valid])
            self._positions[device] = out
        return self._positions[device]

    def add_fused(self, layer: int, part: dict[str, torch.Tensor]) -> None:
        """Add one layer's statistics from the fused kernel (``[g, I]`` per statistic, rows in the
        order of this pass's present groups)."""
        if not self._present:
            return
        slots = self._pass_slots()
        for name in self.spec.stats:
            value = part[name]
            self._add(name, layer, slots, value.to(torch.int64) if name in ("active", "nonzero", "hist") else value.double())

    def _pass_slots(self) -> torch.Tensor:
        """This pass's accumulator rows on the accumulators' device, made once per pass (not once per
        layer: on a GPU each new host-to-device copy waits for the stream)."""
        if self._slots is None:
            self._slots = torch.tensor([self._slot[g] for g in self._present], device=self.device)
        return self._slots

    def _bins(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Each value's bin ``[Tv, I]`` in ``0..n_bins-1``: of the fixed edges, or of its neuron's range."""
        if self.spec.hist_bins is None:
            key = (x.device, x.dtype)
            if key not in self._edges_on:
                self._edges_on[key] = torch.tensor(self.spec.hist_edges, dtype=x.dtype, device=x.device)
            return torch.bucketize(x, self._edges_on[key], right=True)
        key = ("ranges", x.device)
        if key not in self._edges_on:
            self._edges_on[key] = tuple(torch.as_tensor(np.asarray(a, np.float32), device=x.device)
                                        for a in self.spec.hist_ranges)
        lo, width = (a[layer] for a in self._edges_on[key])
        inner = self.spec.hist_bins
        shifted = x - lo
        q = torch.div(shifted, width, rounding_mode="floor")  # DLN's float32 floor division; NaN for +-inf
        q = torch.where(torch.isneginf(shifted), -1.0, q).nan_to_num_(nan=float(inner))  # NaN, +inf: overflow
        return q.clamp_(-1, inner).to(torch.int64) + 1

    def _histogram(self, x: torch.Tensor, token_slot: torch.Tensor, n_groups: int, layer: int) -> torch.Tensor:
        n_bins, width = self.spec.n_bins, self.width
        bins = self._bins(x, layer)  # [Tv, I] in 0..n_bins-1
        cell = token_slot[:, None] * width + torch.arange(width, device=x.device)[None, :]
        flat = (cell * n_bins + bins).reshape(-1)
        counts = torch.bincount(flat, minlength=n_groups * width * n_bins)
        return counts.view(n_groups, width, n_bins)

    def _add(self, name: str, layer: int, slots: torch.Tensor, part: torch.Tensor) -> None:
        self._acc[name][:, layer].index_add_(0, slots, part.to(self.device))

    def result(self) -> dict[int, dict[str, np.ndarray]]:
        """``{group: {"tokens": int, "active": [L, I], "act_sum": ..., ...}}`` as NumPy arrays."""
        out = {}
        for g, slot in self._slot.items():
            out[g] = {"tokens": self.tokens.get(g, 0)}
            for name in self.spec.stats:
                out[g][VARIABLES[name]] = self._acc[name][slot].cpu().numpy()
        return out
