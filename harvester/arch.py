"""One record per supported architecture: where its MLP neurons (and residual stream) live, in
Hugging Face and in vLLM, how LoRA reaches them, and the tiny model the tests and demos build.

A neuron's activation is the value the statistics count (``--site mlp``, the default):
- gated MLPs (Llama, Mistral, Qwen2/3, Gemma/Gemma 2, Cohere/Aya, Phi-3): ``act_fn(gate_proj(x))``,
  the value that multiplies ``up_proj(x)``;
- non-gated MLPs (GPT-2/mGPT, BLOOM, OPT, GPT-NeoX): the activation output that feeds the output
  projection.
In every supported Hugging Face implementation that value is the output of one activation module
per layer, so one forward hook on it sees exactly the statistic, ``[batch, seq, neurons]``.

``--site gate`` counts the gate projection's output instead, ``gate_proj(x)``: the pre-activation,
the input of ``act_fn`` (gated MLPs with a gate projection of their own). Mondal et al. took their
intervention values there (see the README).

``--unit down-input`` counts what the down (output) projection receives, read by a forward pre-hook
on ``down_proj``: in a gated MLP the product ``act_fn(gate_proj(x)) * up_proj(x)``, in a non-gated one
the activation's output again. The Aya-23 specialization study counted its non-zero values there.

The residual-stream units (``--site residual``, as the language-localizer study used) are the
outputs of each transformer block, of width ``hidden_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harvester.errors import HarvestError

if TYPE_CHECKING:  # torch only for the annotations: the registry is read without it
    import torch


@dataclass(frozen=True)
class Arch:
    """Everything lsn knows about one architecture (``config.model_type``). Module paths are dotted,
    relative to the ``*ForCausalLM`` model, with ``{layer}`` for the layer index."""

    name: str
    """``config.model_type``: the registry key, and ``tiny:NAME``."""
    act: str
    """The activation module, whose output is the neuron activation (``--site mlp``); interventions
    write into its output."""
    block: str
    """The transformer block, whose output is the residual stream (``--site residual``)."""
    mlp: str
    """The module holding the MLP's projections and activation (OPT: the block itself)."""
    up_proj: str
    """The projection from the hidden size up to the neurons: ``up_proj`` (gated; Phi-3's fused
    ``gate_up_proj``), or the input projection of a non-gated MLP (``c_fc``, ``fc1``, ``dense_h_to_4h``)."""
    down_proj: str
    """The projection from the neurons back to the hidden size; its input is ``--unit down-input``."""
    gated: bool
    """``act`` multiplies ``up_proj(x)`` (a gated MLP), rather than feeding ``down_proj`` alone."""
    width_key: str | None
    """The config attribute holding the neurons per layer (None, or unset: ``4 * hidden_size``)."""
    tiny: dict = field(compare=False)
    """``AutoConfig.for_model`` keywords of the built-in ``tiny:NAME`` model (with :mod:`harvester.tiny`'s
    vocabulary and special tokens)."""
    gate_proj: str | None = None
    """The gate projection, whose output is the pre-activation (``--site gate``); None where the MLP is
    not gated or its gate is fused with ``up_proj`` (Phi-3)."""
    vllm_act: str | None = None
    """vLLM's activation module where its path differs from ``act``. In gated MLPs vLLM fuses the
    activation with the product (``SiluAndMul`` and kin, whose input is ``[gate | up]``), so the vLLM
    backend recomputes the statistic from that module's input."""
    lora: bool = False
    """Neuron-restricted LoRA applies: ``gate_proj``/``up_proj`` and ``down_proj`` are ``nn.Linear``
    whose rows (columns) are the neurons (not GPT-2's ``Conv1D``, not Phi-3's fused ``gate_up_proj``)."""
    attention: tuple[str, ...] = ()
    """The attention projections ``--attention-lora`` adapts."""

    @property
    def vllm_site(self) -> str:
        return self.vllm_act or self.act

    @property
    def lora_inputs(self) -> tuple[str, ...]:
        """The projections whose output rows are the neurons."""
        return tuple(p for p in (self.gate_proj, self.up_proj) if p)

    def paths(self) -> dict[str, str]:
        """Every Hugging Face module path the record names (for the completeness test)."""
        named = {"act": self.act, "block": self.block, "mlp": self.mlp, "up_proj": self.up_proj,
                 "down_proj": self.down_proj, "gate_proj": self.gate_proj}
        named |= {f"attention[{k}]": p for k, p in enumerate(self.attention)}
        return {k: v for k, v in named.items() if v}


# The registry. A new architecture (or a preset's quirk) is one entry here: the HF paths of its
# activation, block, MLP and projections, its vLLM activation where that differs, whether the
# neuron-restricted LoRA applies and its attention projections, and its tiny config. Nothing else
# needs editing: the backends, the interventions, LoRA and ``tiny:NAME`` all read this table, and
# tests/test_arch.py checks every entry against its tiny model.
_L, _M = "model.layers.{layer}", "model.layers.{layer}.mlp"
_TINY_GATED = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=512)
_ATTENTION = tuple(f"{_L}.self_attn.{p}_proj" for p in "qkvo")


def _gated(name: str, **tiny) -> Arch:
    """A Llama-style MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, in vLLM ``SiluAndMul`` (or
    another fused ``*AndMul``) at ``mlp.act_fn``."""
    return Arch(name, act=f"{_M}.act_fn", block=_L, mlp=_M, up_proj=f"{_M}.up_proj", down_proj=f"{_M}.down_proj",
                gated=True, width_key="intermediate_size", tiny=dict(_TINY_GATED, **tiny), gate_proj=f"{_M}.gate_proj",
                lora=True, attention=_ATTENTION)


def _h_to_4h(name: str, layers: str, attention: tuple[str, ...], act: str, width_key: str | None, tiny: dict) -> Arch:
    """BLOOM and GPT-NeoX: ``dense_4h_to_h(act(dense_h_to_4h(x)))``."""
    return Arch(name, act=f"{layers}.mlp.{act}", block=layers, mlp=f"{layers}.mlp",
                up_proj=f"{layers}.mlp.dense_h_to_4h",
                down_proj=f"{layers}.mlp.dense_4h_to_h", gated=False,
                width_key=width_key,
                tiny=tiny, lora=True, attention=tuple(f"{layers}.{a}" for a in attention))


_OPT = "model.decoder.layers.{layer}"
ARCHS: dict[str, Arch] = {a.name: a for a in (
    _gated("llama"),
    _gated("mistral"),
    _gated("qwen2"),
    _gated("qwen3", head_dim=32),
    _gated("gemma", head_dim=32),
    _gated("gemma2", head_dim=32, tie_word_embeddings=True),  # as released; vLLM's Gemma 2 needs it
    _gated("cohere"),
    Arch("phi3", act=f"{_M}.activation_fn", block=_L, mlp=_M, up_proj=f"{_M}.gate_up_proj", down_proj=f"{_M}.down_proj",
         gated=True, width_key="intermediate_size", tiny=_TINY_GATED, vllm_act=f"{_M}.act_fn"),
    Arch("gpt2", act="transformer.h.{layer}.mlp.act", block="transformer.h.{layer}", mlp="transformer.h.{layer}.mlp",
         up_proj="transformer.h.{layer}.mlp.c_fc", down_proj="transformer.h.{layer}.mlp.c_proj", gated=False,
         width_key="n_inner",
         tiny=dict(n_embd=64, n_inner=128, n_layer=3, n_head=2, n_positions=512)),
    _h_to_4h("bloom", "transformer.h.{layer}", ("self_attention.query_key_value", "self_attention.dense"), "gelu_impl", None,
             dict(hidden_size=64, n_layer=3, n_head=2, tie_word_embeddings=True)),  # as released; vLLM needs it
    Arch("opt", act=f"{_OPT}.activation_fn", block=_OPT, mlp=_OPT, up_proj=f"{_OPT}.fc1", down_proj=f"{_OPT}.fc2",
         gated=False, width_key="ffn_dim",
         tiny=dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=2, word_embed_proj_dim=64,
                   max_position_embeddings=512),
         lora=True, attention=tuple(f"{_OPT}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))),
    _h_to_4h("gpt_neox", "gpt_neox.layers.{layer}", ("attention.query_key_value", "attention.dense"), "act",
             "intermediate_size", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                  max_position_embeddings=512)),
)}
ADAPTERS = ARCHS
"""The registry's earlier name."""


def supported() -> str:
    return ", ".join(sorted(ARCHS))


def record(config, what: str = "") -> Arch:
    """The registry's record of ``config``'s architecture; an unregistered one is refused in one line
    (``what`` says what needed it)."""
    found = ARCHS.get(config.model_type)
    if found is None:
        raise HarvestError(f"{what or 'lsn'} does not know architecture '{config.model_type}'; "
                           f"supported: {supported()}")
    return found


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


UNITS = ("mlp", "gate", "down-input", "residual")
"""What a harvest counts (``--unit``): the MLP neurons' activation, the gate projection's output (the
same neurons, before the activation), the down projection's input (the same neurons, after the gated
product), or the residual stream."""

INPUT_UNITS = ("down-input",)
"""Units read from their module's input (a forward pre-hook), not its output."""


def reads_input(unit: str) -> bool:
    """Whether ``unit``'s values are its hooked module's input (``down-input``) rather than its output."""
    return unit in INPUT_UNITS


def resolve_site(config, site: str | None, unit: str = "mlp") -> str:
    """The hooked module pattern for ``config``: the user's, or the registry's MLP activation
    (``unit="mlp"``), gate projection (``unit="gate"``), down projection (``unit="down-input"``, whose
    input is read) or transformer block, whose output is the residual stream (``unit="residual"``)."""
    check_causal(config)
    if unit not in UNITS:
        raise HarvestError(f"--site must be one of {', '.join(UNITS)}, not '{unit}'")
    if site:
        if "{layer}" not in site:
            raise HarvestError(f"--site-module '{site}' must contain '{{layer}}', e.g. model.layers.{{layer}}.mlp.act_fn")
        return site
    found = ARCHS.get(config.model_type)
    if found is None:
        raise HarvestError(
            f"unsupported architecture '{config.model_type}'; supported: {supported()}; "
            "or name the activation module yourself with --site-module 'model.layers.{layer}.mlp.act_fn'"
        )
    if unit == "gate" and found.gate_proj is None:
        gated = sorted(a.name for a in ARCHS.values() if a.gate_proj)
        raise HarvestError(f"--unit gate needs a gate projection of its own, which '{found.name}' has not "
                           f"({'its gate is fused with up_proj' if found.gated else 'its MLP is not gated'}); "
                           f"architectures with one: {', '.join(gated)}")
    return {"mlp": found.act, "gate": found.gate_proj, "down-input": found.down_proj, "residual": found.block}[unit]


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


def mlp_width(config) -> int:
    """Neurons per layer, from the config (the record's ``width_key``, else ``4 * hidden_size``)."""
    value = getattr(config, record(config).width_key or "", None)
    return value if isinstance(value, int) and value > 0 else 4 * config.hidden_size
