"""LoRA restricted to a mask's neurons, in peft's own format.

For MLP neuron ``i`` of layer ``l`` the weights that belong to it are:
- row ``i`` of the input projections (``gate_proj`` and ``up_proj`` in gated MLPs, ``fc1`` or
  ``dense_h_to_4h`` otherwise);
- column ``i`` of the output projection (``down_proj``, ``fc2``, ``dense_4h_to_h``).

A peft LoRA adapter on those modules adds ``ΔW = scale · B A``. Only the selected neurons' rows of
``B`` (input projections) and columns of ``A`` (output projection) are trainable; every other row
or column is an exact, constant zero, so ``ΔW`` is zero there exactly. Each restricted matrix is a
``torch.nn.utils.parametrize`` parametrization that scatters a small trainable ``[selected, r]``
(or ``[r, selected]``) parameter into zeros. The optimizer therefore holds state only for the
selected rows and columns, plus the shared ``A`` of the input projections and ``B`` of the output
projection. :func:`bake` folds the parametrizations back into plain LoRA weights before saving or
merging.

After ``merge_and_unload`` every non-selected neuron's rows and columns are bit-identical to the base
model's. The adapter is an ordinary peft LoRA adapter (``PeftModel.from_pretrained``), whose masked
rows and columns hold exact zeros.

``--lora-modules`` picks the restricted projections by role (``gate``, ``up``, ``down``; Mondal et al.
train ``gate`` only). ``--attention-lora`` adds ordinary LoRA on the attention projections named by
``--attention-modules`` (``q,k,v,o``; Mondal et al.'s XQuAD setup: ``q,k,v``). Layers without selected
neurons get no MLP adapter at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harvester import arch
from harvester.errors import HarvestError


@dataclass(frozen=True)
class MLPNames:
    """An architecture's LoRA targets relative to its transformer blocks: a view of its record in
    :data:`harvester.arch.ARCHS`, where they are defined."""

    layers: str
    """The list of transformer blocks."""
    inputs: tuple[str, ...]
    """Modules whose output rows are the neurons (relative to the block): gate and up, or the input projection."""
    output: str
    """Module whose input columns are the neurons: down, or the output projection."""
    attention: tuple[str, ...]


def mlp_names(config) -> MLPNames:
    """``config``'s LoRA targets; architectures whose MLP projections are not ``nn.Linear`` layers with one
    row (column) per neuron are refused."""
    record = arch.ARCHS.get(config.model_type)
    if record is None or not record.lora:
        supported = sorted(name for name, a in arch.ARCHS.items() if a.lora)
        raise HarvestError(f"neuron-restricted LoRA supports {', '.join(supported)} (linear MLP projections), "
                           f"not '{config.model_type}'")
    block = record.block + "."

    def relative(path: str) -> str:
        return path.removeprefix(block)

    return MLPNames(record.block.removesuffix(".{layer}"), tuple(map(relative, record.lora_inputs)),
                    relative(record.down_proj), tuple(map(relative, record.attention)))


# -- roles of the module names above; moves into the arch record (harvester/arch.py) --------------------
ROLES = ("gate", "up", "down")
ATTENTION_ROLES = ("q", "k", "v", "o")


def mlp_roles(names: MLPNames) -> dict[str, str]:
    """``{"gate": ..., "up": ..., "down": ...}`` (no ``gate`` in non-gated MLPs, whose input projection is ``up``)."""
    roles = {"up": names.inputs[-1], "down": names.output}
    if len(names.inputs) == 2:
        roles["gate"] = names.inputs[0]
    return roles


def attention_roles(names: MLPNames) -> dict[frozenset, str]:
    """Which module each set of attention roles is: one each, or fused ``query_key_value`` for q, k and v."""
    if len(names.attention) == 4:
        return {frozenset(r): m for r, m in zip(ATTENTION_ROLES, names.attention)}
    return {frozenset("qkv"): names.attention[0], frozenset("o"): names.attention[1]}


def pick_modules(names: MLPNames, mlp: list[str], attention: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The module names of the restricted roles ``mlp`` (``["all"]``: every one the model has) and of the
    attention roles ``attention``; one-line errors."""
    roles = mlp_roles(names)
    mlp = list(roles) if mlp == ["all"] else mlp
    bad = [r for r in mlp if r not in roles]
    if bad or not mlp:
        raise HarvestError(f"--lora-modules must be from {', '.join(r for r in ROLES if r in roles)} for this model, "
                           f"not '{','.join(bad or mlp)}'")
    picked, wanted = [], set(attention)
    if not wanted <= set(ATTENTION_ROLES):
        raise HarvestError(f"--attention-modules must be from q, k, v, o, not '{','.join(attention)}'")
    for group, module in attention_roles(names).items():
        if group & wanted and not group <= wanted:
            raise HarvestError(f"this model fuses {','.join(sorted(group))} in one module ({module}): "
                               f"--attention-modules takes all of them or none")
        if group <= wanted:
            picked.append(module)
    return tuple(roles[r] for r in ROLES if r in mlp), tuple(m for m in names.attention if m in picked)


def mlp_width(config) -> int:
    """Neurons per layer, from the config."""
    return arch.mlp_width(config)


def per_layer(selected: np.ndarray, n_layers: int, width: int) -> dict[int, np.ndarray]:
    """Flat indices -> ``{layer: sorted neuron indices}`` for the layers that have any."""
    out = {}
    for layer in range(n_layers):
        units = selected[selected // width == layer] - layer * width
        if units.size:
            out[layer] = np.sort(units)
    return out


def add_restricted_lora(model, selected: np.ndarray | None, width: int, rank: int, alpha: float,
                        attention: bool, dropout: float = 0.0, modules: tuple[str, ...] = ("all",),
                        attention_modules: tuple[str, ...] = ATTENTION_ROLES):
    """``model`` wrapped by peft with LoRA on the MLP projections (roles ``modules``) of the selected neurons
    (``None``: ordinary LoRA on those projections, the ``full`` control), and on attention if asked."""
    from peft import LoraConfig, get_peft_model

    names = mlp_names(model.config)
    inputs, attn = pick_modules(names, list(modules), list(attention_modules))
    output = (names.output,) if names.output in inputs else ()
    inputs = tuple(m for m in inputs if m != names.output)
    n_layers = model.config.num_hidden_layers
    layers = per_layer(selected, n_layers, width) if selected is not None else {l: None for l in range(n_layers)}
    if not layers:
        raise HarvestError("the mask selects no neuron for this language: nothing to train")
    targets = [f"{names.layers}.{l}.{m}" for l in sorted(layers) for m in (*inputs, *output)]
    if attention:
        targets += [f"{names.layers}.{l}.{m}" for l in range(n_layers) for m in attn]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if selected is not None:
        modules = dict(peft_model.base_model.model.named_modules())
        for layer, units in layers.items():
            index = torch.as_tensor(units, dtype=torch.long)
            for name in inputs:
                _restrict(modules[f"{names.layers}.{layer}.{name}"].lora_B["default"], index, dim=0)
            for name in output:
                _restrict(modules[f"{names.layers}.{layer}.{name}"].lora_A["default"], index, dim=1)
    return peft_model


class _Scatter(torch.nn.Module):
    """A weight that is zero except at ``index`` along ``dim``, where it is the trainable ``values``."""

    def __init__(self, initial: torch.Tensor, index: torch.Tensor, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.to(initial.device))
        self.values = torch.nn.Parameter(initial.detach().index_select(dim, self.index).clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(original).index_copy(self.dim, self.index, self.values)


def _restrict(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> None:
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(linear, "weight", _Scatter(linear.weight, index, dim))
    linear.parametrizations.weight.original.requires_grad_(False)


def bake(peft_model) -> None:
    """Fold the restrictions into plain LoRA weights (for saving and merging); the values are kept."""
    from torch.nn.utils import parametrize

    for module in list(peft_model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def changed_neurons(base_state: dict, merged_model, config, width: int) -> dict[int, np.ndarray]:
    """Per layer, the neurons whose input rows or output column differ from ``base_state``."""
    names = mlp_names(config)
    state = merged_model.state_dict()
    out = {}
    for layer in range(config.num_hidden_layers):
        diff = torch.zeros(width, dtype=torch.bool)
        for name in names.inputs:
            key = f"{names.layers}.{layer}.{name}.weight"
            diff |= (state[key] != base_state[key]).any(dim=1)
        key = f"{names.layers}.{layer}.{names.output}.weight"
        diff |= (state[key] != base_state[key]).any(dim=0)
        out[layer] = np.flatnonzero(diff.numpy())
    return out
