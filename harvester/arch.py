"""Where each architecture's MLP neuron activation (and residual stream) lives.

A neuron's activation is the value the statistics count:
- gated MLPs (Llama, Mistral, Qwen2/3, Gemma/Gemma 2, Cohere/Aya, Phi-3): ``act_fn(gate_proj(x))``,
  the value that multiplies ``up_proj(x)``;
- non-gated MLPs (GPT-2/mGPT, BLOOM, OPT, GPT-NeoX): the activation output that feeds the output
  projection.
In every supported Hugging Face implementation that value is the output of one activation module
per layer, so one forward hook on it sees exactly the statistic, ``[batch, seq, neurons]``.

The residual-stream units (``--site residual``, as the language-localizer study used) are the
outputs of each transformer block, of width ``hidden_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harvester.errors import HarvestError


@dataclass(frozen=True)
class Adapter:
    """How to find layer ``l``'s activation module in a ``*ForCausalLM`` model."""

    name: str
    site: str  # dotted path with ``{layer}``, relative to the causal-LM model
    gated: bool
    block: str = "model.layers.{layer}"
    """The transformer block, whose output is the residual stream (``--site residual``)."""


_GATED = "model.layers.{layer}.mlp.act_fn"

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", _GATED, True),
    "mistral": Adapter("mistral", _GATED, True),
    "qwen2": Adapter("qwen2", _GATED, True),
    "qwen3": Adapter("qwen3", _GATED, True),
    "gemma": Adapter("gemma", _GATED, True),
    "gemma2": Adapter("gemma2", _GATED, True),
    "cohere": Adapter("cohere", _GATED, True),
    "phi3": Adapter("phi3", "model.layers.{layer}.mlp.activation_fn", True),
    "gpt2": Adapter("gpt2", "transformer.h.{layer}.mlp.act", False, "transformer.h.{layer}"),
    "bloom": Adapter("bloom", "transformer.h.{layer}.mlp.gelu_impl", False, "transformer.h.{layer}"),
    "opt": Adapter("opt", "model.decoder.layers.{layer}.activation_fn", False, "model.decoder.layers.{layer}"),
    "gpt_neox": Adapter("gpt_neox", "gpt_neox.layers.{layer}.mlp.act", False, "gpt_neox.layers.{layer}"),
}


def supported() -> str:
    return ", ".join(sorted(ADAPTERS))


def site_name(site: str, layer: int) -> str:
    """The stable, greppable name of layer ``layer``'s hook point."""
    return site.format(layer=layer)


# Encoder models that transformers can wrap in a causal-LM head, yet are bidirectional unless
# configured with ``is_decoder=True``.
_ENCODERS = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie", "roformer",
             "data2vec-text", "bert-generation", "megatron-bert", "rembert", "xmod", "big_bird", "modernbert"}


def check_causal(config) -> None:
    """Refuse encoder-only and encoder-decoder models with a clear message."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    encoder = config.model_type in _ENCODERS and not getattr(config, "is_decoder", False)
    if encoder or getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise HarvestError(
            f"model type '{config.model_type}' is not a causal language model; "
            f"supported architectures: {supported()}"
        )


UNITS = ("mlp", "residual")


def resolve_site(config, site: str | None, unit: str = "mlp") -> str:
    """The hooked module pattern for ``config``: the user's, or the registry's MLP activation
    (``unit="mlp"``) or transformer block, whose output is the residual stream (``unit="residual"``)."""
    check_causal(config)
    if unit not in UNITS:
        raise HarvestError(f"--site must be mlp or residual, not '{unit}'")
    if site:
        if "{layer}" not in site:
            raise HarvestError(f"--site-module '{site}' must contain '{{layer}}', e.g. model.layers.{{layer}}.mlp.act_fn")
        return site
    adapter = ADAPTERS.get(config.model_type)
    if adapter is None:
        raise HarvestError(
            f"unsupported architecture '{config.model_type}'; supported: {supported()}; "
            "or name the activation module yourself with --site-module 'model.layers.{layer}.mlp.act_fn'"
        )
    return adapter.site if unit == "mlp" else adapter.block


def site_modules(model: torch.nn.Module, site: str) -> list[torch.nn.Module]:
    """Layer-ordered activation modules matching ``site``; every layer must have its own module."""
    found = dict(model.named_modules(remove_duplicate=False))
    modules = []
    while site_name(site, len(modules)) in found:
        modules.append(found[site_name(site, len(modules))])
    if not modules:
        raise HarvestError(f"no module named '{site_name(site, 0)}' in this {type(model).__name__}")
    if len({id(m) for m in modules}) != len(modules):
        raise HarvestError(f"the modules '{site}' are shared between layers; point --site-module at per-layer modules")
    return modules
