"""Presets: one name per published study, setting every option its code fixes, in every command it touches.

A preset is defaults, not a mode: ``--config`` and the flags given win over it. Each preset's values for
a command are the dict its stage exports (``harvester.config.LOCALIZER``, ``analysis.cli.LOCALIZER``, ...),
so a fact about a study lives in one place; this table only names them and the reference files they follow.
``lsn presets`` prints it, and the README's preset table is checked against it in the tests.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from analysis import cli as analysis_cli
from harvester import config as harvest_config
from harvester.options import Command, Keyed
from jobs import options as job_options


@dataclass(frozen=True)
class Preset:
    study: str
    """the paper, as people cite it"""
    follows: str
    """the reference repository (and the files whose settings are taken)"""
    commands: dict[str, dict]
    """command (``harvest``, ``analyze lape``, ``intervene ppl``) -> its option values (field names), or a
    :class:`Keyed` of them by one of its options (``finetune``'s ``--task``)"""


PRESETS: dict[str, Preset] = {
    "lape": Preset(
        "Tang et al., ACL 2024 (LAPE)", "RUCAIBox/Language-Specific-Neurons: activation.py, identify.py, ppl.py",
        {"harvest": harvest_config.LAPE, "analyze lape": {"top_rate": 0.01, "filter_rate": 0.95, "bar_ratio": 0.95},
         "intervene ppl": job_options.LAPE_PPL}),
    "lna": Preset(
        "Zhang et al., 2025 (the alignment study)",
        "NJUNLP/Language-Neurons-Alignment: language_neurons_alignment/activation.py, identify.py, ppl.py",
        {"harvest": harvest_config.LNA,
         "analyze entropy-lambda": {"top_rate": 0.01, "bar_ratio": 0.95, "response_only": True},
         "analyze autosweep": {"top_rate": 0.01, "response_only": True},
         "intervene ppl": job_options.LNA_PPL}),
    "mondal": Preset(
        "Mondal et al., 2025 (Language-specific Neurons Do Not Facilitate Cross-Lingual Transfer)",
        "soumenkm/LangSpecificNeurons: code/activation.py, models.py, lang_neurons.py, lora_cls_finetune.py, "
        "lora_instruct_finetune.py",
        {"harvest": harvest_config.MONDAL, "analyze act-prob-90p": analysis_cli.MONDAL_90P,
         "analyze lape-variant": analysis_cli.MONDAL_LAPE, "finetune": Keyed("task", job_options.MONDAL_FINETUNE)}),
    "localizer": Preset(
        "AlKhamissi et al., 2024 (The LLM Language Network)", "BKHMSI/llm-localization: localize.py, random_mask.py",
        {"harvest": harvest_config.LOCALIZER, "analyze localizer": analysis_cli.LOCALIZER,
         "analyze random": analysis_cli.LOCALIZER_RANDOM}),
    "aya": Preset(
        "Trinley et al., 2025 (neuron specialization in Aya-23, after Tan et al., 2024)",
        "KatharinaTrinley/MechInterp-Aya-Neuron-Specialization: aya_get_neurons_EC40.py, aya23-NS-ec40.sh, "
        "visualization-scripts/all-langs-IoU.py",
        {"harvest": harvest_config.AYA, "analyze coverage": analysis_cli.AYA}),
}


def for_command(path: tuple[str, ...]) -> dict[str, dict]:
    """``{preset: values}`` of every preset that sets something for the command ``path``."""
    key = " ".join(("analyze", *path[1:]) if path[0] == "convergence" else path)  # a method's, for its curve
    return {name: p.commands[key] for name, p in PRESETS.items() if key in p.commands}


@dataclass(kw_only=True)
class PresetsOptions:
    name: typing.Literal[tuple(PRESETS)] | None = None  # type: ignore[valid-type]
    """the preset to show (all of them without it)"""

    POSITIONAL = ("name",)


def entries(preset: Preset) -> list[tuple[str, dict]]:
    """``(command, values)`` of a preset, a :class:`Keyed` command once per key (``finetune --task xnli``)."""
    out = []
    for command, values in preset.commands.items():
        if isinstance(values, Keyed):
            out += [(f"{command} --{values.option.replace('_', '-')} {key}", v) for key, v in values.values.items()]
        else:
            out.append((command, values))
    return out


def show(options: PresetsOptions) -> None:
    for name in [options.name] if options.name else PRESETS:
        preset = PRESETS[name]
        print(f"{name}: {preset.study}\n  follows {preset.follows}")
        for command, values in entries(preset):
            shown = " ".join(f"--{k.replace('_', '-')} {_shown(v)}" for k, v in values.items())
            print(f"  lsn {command}: {shown}")


def _shown(value) -> str:
    if value is True:
        return "(on)"
    return str(value)


COMMAND = Command("what each --preset sets: a published study's settings, per command", PresetsOptions, show)
