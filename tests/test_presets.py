"""``--preset NAME``: a study's settings as defaults of every command it touches; ``lsn presets``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harvester.options import parse
from lsn.cli import build_parser, main
from lsn.presets import PRESETS, entries

MINIMAL = {  # the required flags of each command a preset touches
    "harvest": ["--model", "tiny:llama", "--corpus", "sample", "--store", "s"],
    "analyze lape": ["--store", "s", "--out", "m.npz"],
    "analyze entropy-lambda": ["--store", "s", "--out", "m.npz", "--lambda", "0.05"],
    "analyze autosweep": ["--store", "s"],
    "analyze act-prob-90p": ["--store", "s", "--out", "m.npz"],
    "analyze lape-variant": ["--store", "s", "--out", "m.npz"],
    "analyze localizer": ["--store", "s", "--out", "m.npz", "--a", "S", "--b", "N"],
    "analyze coverage": ["--store", "s", "--out", "m.npz"],
    "analyze random": ["--mask", "m.npz", "--out", "r.npz"],
    "intervene ppl": ["--model", "tiny:llama", "--mask", "m.npz", "--corpus", "sample", "--out", "o"],
    "finetune": ["--model", "tiny:llama", "--mask", "m.npz", "--lang", "fr", "--data", "sample", "--out", "o"],
}
VALUES = {(name, command): values for name, preset in PRESETS.items() for command, values in entries(preset)}
CASES = list(VALUES)


def options(argv: list[str]):
    return parse(build_parser(), argv)[1]


def argv(command: str) -> list[str]:
    """``finetune --task xnli`` -> the command, its minimal flags and the key's flag."""
    words = command.split()
    base = [w for w in words if not w.startswith("--")][:2 if words[0] in ("analyze", "intervene") else 1]
    return [*base, *MINIMAL[" ".join(base)], *words[len(base):]]


@pytest.mark.parametrize("name,command", CASES)
def test_a_preset_sets_every_value_it_names(name, command):
    values = VALUES[name, command]
    got = options([*argv(command), "--preset", name])
    assert {k: getattr(got, k) for k in values} == values


def _changed(name: str, command: str) -> list[tuple[str, object, object]]:
    """``(field, preset value, default)`` where the preset differs from the command's default."""
    defaults = options(argv(command))
    return [(k, v, getattr(defaults, k)) for k, v in VALUES[name, command].items() if getattr(defaults, k) != v]


def _writable(default) -> bool:
    """A default a flag or a YAML value can give back (not a switch, not none)."""
    return not isinstance(default, bool) and default is not None


@pytest.mark.parametrize("name,command", [c for c in CASES if any(_writable(d) for _, _, d in _changed(*c))])
def test_flags_and_config_win_over_a_preset(name, command, tmp_path):
    key, value, default = next(c for c in _changed(name, command) if _writable(c[2]))
    flag = "--" + key.replace("_", "-")
    config = tmp_path / "c.yaml"
    config.write_text(f"{key}: {default}\n", encoding="utf-8")
    assert getattr(options([*argv(command), "--preset", name, "--config", str(config)]), key) == default
    assert getattr(options([*argv(command), "--preset", name, flag, str(default)]), key) == default


def test_presets_lists_every_setting(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.study}" in listing
        assert main(["presets", name]) == 0  # each preset's own lines (two presets may set one command)
        out = capsys.readouterr().out
        block = out.splitlines()
        for command, values in entries(preset):
            line = next(ln for ln in block if ln.strip().startswith(f"lsn {command}:"))  # this preset's own line
            for key in values:
                assert f"--{key.replace('_', '-')}" in line
    assert main(["presets", "lape"]) == 0 and "localizer" not in capsys.readouterr().out


def test_an_unknown_preset_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["analyze", "lape", "--store", "s", "--out", "m.npz", "--preset", "nope"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and "invalid choice" in err


def test_the_readme_table_is_the_presets():
    """Every preset, command and value in ``PRESETS`` is in the README's preset table, and no other."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = [ln for ln in text.splitlines() if ln.startswith("| `--preset ")]
    table = {}
    for row in rows:
        name, command, settings = (c.strip() for c in row.strip("|").split("|")[:3])
        table[(name.split()[1].strip("`"), command.strip("`").removeprefix("lsn "))] = settings
    assert set(table) == set(CASES)
    for (name, command), settings in table.items():
        shown = dict(re.findall(r"`--([\w-]+)(?: ([^`]+))?`", settings))
        want = {k.replace("_", "-"): ("" if v is True else str(v)) for k, v in VALUES[name, command].items()}
        assert shown == want, (name, command)


def test_a_refusal_names_the_preset_that_set_the_flag(tmp_path, capsys):
    """``--preset aya`` on running text: the refused --template was never typed; the line says who set it."""
    from tests.conftest import write_text_corpus

    corpus = write_text_corpus(tmp_path / "text", langs=("en",), docs=2)
    assert main(["harvest", "--preset", "aya", "--model", "tiny:llama", "--corpus", f"text:{corpus}", "--store",
                 str(tmp_path / "s"), "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("lsn: error: --template is for instruct and ec40 corpora; no corpus here is one "
                           "(--template set by --preset aya)"), err
    assert main(["harvest", "--preset", "aya", "--model", "tiny:llama", "--corpus", f"text:{corpus}", "--store",
                 str(tmp_path / "s"), "--no-ray", "--template", "x {src}"]) == 2
    assert "set by --preset" not in capsys.readouterr().err  # typed: the user's own


def test_a_keyed_preset_follows_its_option(tmp_path):
    """``--preset mondal`` on finetune: the task's own settings, the task typed or from --config; a task the
    study has none for is one line."""
    from harvester.errors import HarvestError
    from jobs.options import MONDAL_FINETUNE

    for task in ("xnli", "xquad"):
        got = options([*argv(f"finetune --task {task}"), "--preset", "mondal"])
        assert {k: getattr(got, k) for k in MONDAL_FINETUNE[task]} == MONDAL_FINETUNE[task]
        config = tmp_path / f"{task}.yaml"
        config.write_text(f"task: {task}\n", encoding="utf-8")
        got = options([*argv("finetune"), "--preset", "mondal", "--config", str(config)])
        assert {k: getattr(got, k) for k in MONDAL_FINETUNE[task]} == MONDAL_FINETUNE[task]
    with pytest.raises(HarvestError, match=re.escape("--preset mondal has settings for --task xnli|xquad, not clm")):
        options([*argv("finetune --task clm"), "--preset", "mondal"])
