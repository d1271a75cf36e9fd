"""A fused Triton kernel for gated MLPs: the activation product and the per-neuron statistics in one pass.

For a gated MLP, ``h = act(gate) * up`` is what feeds ``down_proj``, and the neuron's activation
``a = act(gate)`` is what the statistics count. The kernel reads each ``[tokens, neurons]`` tile of
``gate`` and ``up`` once, writes ``h``, and accumulates, per token group and neuron:
- the count of ``a > 0``;
- the sum and the sum of squares of ``a``;
- the sum of ``|a|``;
- optionally, the histogram of ``a`` over fixed edges (the bins of :mod:`harvester.stats`).

In bfloat16 and float16 the kernel rounds as the model does: ``a`` to the model's dtype (the value
a hook on ``act_fn`` sees and counts), then ``a * up``; so the next layer gets the model's own input,
and the statistics equal the hook path's in every layer, not only the first.

Tokens with group -1 (padding) are never counted. Each program owns a tile of neurons and walks over
every token, so its accumulators need no atomics. The sums are float32 within one call, as in the
matrix-product path of :class:`harvester.stats.NeuronStats`.

On CPU the hook path (:class:`harvester.stats.NeuronStats` on a forward hook) stays. The kernel
is checked against it on CPU with Triton's interpreter (``TRITON_INTERPRET=1``), which must be set
before this module is imported.
"""

from __future__ import annotations

import torch

from harvester.errors import HarvestError

ACTIVATIONS = {"silu": 0, "relu": 1, "gelu_tanh": 2}
"""Activations the kernel computes (``act_fn`` of the HF gated MLPs: SiLU, ReLU, GELU-tanh)."""

_ROUNDING = {torch.bfloat16: 1, torch.float16: 2}
"""The kernel's ``ROUND`` for each half-precision dtype (0: float32, nothing to round)."""

_BLOCK_T = 32
_BLOCK_I = 32


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fused_gated_stats(gate_ptr, up_ptr, out_ptr, gid_ptr, active_ptr, sum_ptr, sqsum_ptr, abs_ptr,
                          hist_ptr, edges_ptr, T, I, G,
                          ACT: tl.constexpr, ROUND: tl.constexpr, N_EDGES: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_I: tl.constexpr):
        pid = tl.program_id(0)
        cols = pid * BLOCK_I + tl.arange(0, BLOCK_I)
        col_ok = cols < I
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < T
            ok = row_ok[:, None] & col_ok[None, :]
            offs = rows[:, None] * I + cols[None, :]
            g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if ACT == 0:
                a = g / (1.0 + tl.exp(-g))
            elif ACT == 1:
                a = tl.maximum(g, 0.0)
            else:
                inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
                a = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
            # a = act(gate) rounded to the model's dtype, as the hook path sees it, then h = a * up
            # rounded: the model's own two roundings. To nearest even; bfloat16 by integer arithmetic,
            # since Triton's interpreter truncates casts to bfloat16 where a GPU rounds them.
            if ROUND == 1:
                bits = a.to(tl.uint32, bitcast=True)
                even = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                a = tl.where(a != a, a, even.to(tl.float32, bitcast=True))
            elif ROUND == 2:
                a = a.to(tl.float16).to(tl.float32)
            h = a * u
            if ROUND == 1:
                bits = h.to(tl.uint32, bitcast=True)
                even = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                h = tl.where(h != h, h, even.to(tl.float32, bitcast=True))
            tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=ok)
            gid = tl.load(gid_ptr + rows, mask=row_ok, other=-1)
            for k in range(0, G):
                sel = ok & (gid[:, None] == k)
                acc = k * I + cols
                zero = tl.zeros_like(a)
                n_active = tl.sum(tl.where(sel & (a > 0), 1, 0), axis=0)
                tl.store(active_ptr + acc, tl.load(active_ptr + acc, mask=col_ok) + n_active, mask=col_ok)
                x = tl.where(sel, a, zero)
                tl.store(sum_ptr + acc, tl.load(sum_ptr + acc, mask=col_ok) + tl.sum(x, axis=0), mask=col_ok)
                tl.store(sqsum_ptr + acc, tl.load(sqsum_ptr + acc, mask=col_ok) + tl.sum(x * x, axis=0), mask=col_ok)
                tl.store(abs_ptr + acc, tl.load(abs_ptr + acc, mask=col_ok) + tl.sum(tl.abs(x), axis=0), mask=col_ok)
                if N_EDGES > 0:
                    b = tl.zeros(a.shape, dtype=tl.int32)  # bin index: the edges at or below a
                    for j in tl.static_range(N_EDGES):
                        b += tl.where(a >= tl.load(edges_ptr + j), 1, 0)
                    b = tl.where(a != a, N_EDGES, b)  # NaN in the last bin, as torch.bucketize puts it
                    for j in tl.static_range(N_EDGES + 1):
                        n = tl.sum(tl.where(sel & (b == j), 1, 0), axis=0)
                        h_at = (acc * (N_EDGES + 1)) + j
                        tl.store(hist_ptr + h_at, tl.load(hist_ptr + h_at, mask=col_ok) + n, mask=col_ok)

    return fused_gated_stats


_compiled = None


def fused_gated(gate: torch.Tensor, up: torch.Tensor, groups: torch.Tensor, n_groups: int, activation: str,
                edges: torch.Tensor | None = None):
    """``(h, stats)`` for ``gate``, ``up`` of shape ``[T, I]`` and token ``groups [T]`` in
    ``0..n_groups-1`` (-1 = not counted). ``stats``: ``active`` (int32), ``sum``, ``sqsum``, ``abs``
    (float32) of shape ``[n_groups, I]``, and ``hist [n_groups, I, len(edges)+1]`` when ``edges`` are given."""
    global _compiled
    import triton

    if activation not in ACTIVATIONS:
        raise HarvestError(f"the fused kernel computes {', '.join(ACTIVATIONS)}, not '{activation}'")
    if gate.shape != up.shape or gate.dim() != 2 or groups.shape != (gate.shape[0],):
        raise HarvestError(f"fused kernel: gate {tuple(gate.shape)}, up {tuple(up.shape)} and groups "
                           f"{tuple(groups.shape)} do not match")
    if _compiled is None:
        _compiled = _kernel()
    T, I = gate.shape
    gate, up = gate.contiguous(), up.contiguous()
    device = gate.device
    out = torch.empty_like(gate)
    stats = {"active": torch.zeros((n_groups, I), dtype=torch.int32, device=device),
             "sum": torch.zeros((n_groups, I), dtype=torch.float32, device=device),
             "sqsum": torch.zeros((n_groups, I), dtype=torch.float32, device=device),
             "abs": torch.zeros((n_groups, I), dtype=torch.float32, device=device)}
    n_edges = 0 if edges is None else int(edges.numel())
    hist = torch.zeros((n_groups, I, n_edges + 1) if n_edges else (1,), dtype=torch.int32, device=device)
    edge_buf = edges.to(device=device, dtype=torch.float32).contiguous() if n_edges else torch.zeros(1, device=device)
    grid = (triton.cdiv(I, _BLOCK_I),)
    _compiled[grid](gate, up, out, groups.to(device=device, dtype=torch.int32).contiguous(), stats["active"],
                    stats["sum"], stats["sqsum"], stats["abs"], hist, edge_buf, T, I, n_groups,
                    ACT=ACTIVATIONS[activation], ROUND=_ROUNDING.get(gate.dtype, 0), N_EDGES=n_edges,
                    BLOCK_T=_BLOCK_T, BLOCK_I=_BLOCK_I)
    if n_edges:
        stats["hist"] = hist
    return out, stats
