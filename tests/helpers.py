"""Small helpers shared by tests."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import xarray as xr


HARVEST = ["harvest", "--model", "tiny:llama", "--corpus", "sample:docs=20,langs=en+de", "--no-ray",
           "--seq-len", "64", "--shard-tokens", "512", "--no-progress"]
"""The small harvest the store tests (integrity, repair, metadata, edges) damage copies of."""


def harvest(store: Path) -> list[str]:
    return [*HARVEST, "--store", str(store)]


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``: proves that nothing in a store changed."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_totals(a: Path, b: Path) -> None:
    """Bit-identical totals (floats included) in two stores."""
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert list(da.data_vars) == list(db.data_vars)
    for var in da.data_vars:
        np.testing.assert_array_equal(da[var].values, db[var].values, err_msg=var)


def assert_group_ends(pgid: int, what: str, timeout: float = 30) -> None:
    """Every process of the group ``pgid`` (one started with ``start_new_session``) exits in time."""
    deadline = time.time() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, f"{what} outlived it"
        time.sleep(0.1)


def hand_ppl(mask_path, values: dict | None, windows, groups, module: str = "act_fn",
             pre: bool = False) -> dict[str, np.ndarray]:
    """Per mask language: each layer's ``mlp.{module}`` gets a hook written here that sets the language's
    selected units to ``values[lang][layer, unit]`` (``None``: 0), in the module's output, or with ``pre``
    its input; then exp(mean next-token NLL) per evaluated group of ``windows`` on ``tiny:llama``."""
    import torch
    from transformers import AutoModelForCausalLM

    from analysis.masks import Mask
    from harvester.backends.hf import resolve_model

    mask = Mask.load(mask_path)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny:llama"), dtype=torch.float32).eval()
    out = {}
    for lang in mask.languages if values is None else values:
        sel, handles = mask.selected[mask.index(lang)], []
        for layer in range(mask.n_layers):
            units = torch.as_tensor(sel[sel // mask.width == layer] - layer * mask.width, dtype=torch.long)
            vals = None if values is None else torch.as_tensor(values[lang][layer, units.numpy()])

            def change(x, units=units, vals=vals):
                x = x.clone()
                x[..., units] = 0.0 if vals is None else vals.to(x.dtype)
                return x
            target = getattr(model.model.layers[layer].mlp, module)
            handles.append(target.register_forward_pre_hook(lambda m, inputs, change=change: (change(inputs[0]),))
                           if pre else target.register_forward_hook(lambda m, inputs, act, change=change: change(act)))
        total, count = np.zeros(len(groups)), np.zeros(len(groups))
        with torch.no_grad():
            for w in windows:
                logp = torch.log_softmax(model(torch.tensor(w.ids[None].astype(np.int64))).logits[0].double(), -1)
                for t in range(len(w.ids) - 1):
                    if w.groups[t + 1] >= 0:
                        total[w.groups[t + 1]] -= float(logp[t, w.ids[t + 1]])
                        count[w.groups[t + 1]] += 1
        for h in handles:
            h.remove()
        out[lang] = np.exp(total / count)
    return out
