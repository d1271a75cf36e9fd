"""One documented config per command: flags, help and ``--config FILE.yaml`` come from its dataclass;
the packages are layered (harvester < analysis < jobs < lsn) without an import cycle."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from analysis import methods
from harvester.options import field_docs, flag, parse
from lsn.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("harvester", "analysis", "jobs", "lsn")
"""Bottom to top: a package imports only from those before it."""


def commands(parser=None, path=()):
    """``(command words, parser, options class)`` of every leaf command of ``lsn``."""
    parser = parser or build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    if not subs:
        yield path, parser, parser.get_default("_options")
    for action in subs:
        for name, sub in action.choices.items():
            yield from commands(sub, (*path, name))


COMMANDS = {" ".join(path): (path, cls) for path, _, cls in commands()}


def test_every_command_is_found():
    assert {"harvest", "summary", "verify", "analyze lape", "analyze random", "mask export", "mask import",
            "import", "report", "intervene ppl", "intervene generate", "finetune", "demo"} <= set(COMMANDS)
    assert all(dataclasses.is_dataclass(cls) for _, cls in COMMANDS.values())


def _shown(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "(required)"
    if f.default is False:
        return "(default: off)"
    return f"(default: {'none' if f.default is None else f.default})"


def squeeze(text: str) -> str:
    return "".join(text.split())  # argparse wraps lines (and after hyphens)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_field_with_its_meaning_and_default(name, capsys):
    path, cls = COMMANDS[name]
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    text = squeeze(capsys.readouterr().out)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        shown = f.name if f.name in getattr(cls, "POSITIONAL", ()) else flag(f.name)
        assert squeeze(f"{shown}") in text, (name, f.name)
        assert squeeze(f"{docs[f.name]} {_shown(f)}") in text, (name, f.name)
    assert squeeze("--config FILE.yaml") in text


def test_analyze_help_describes_each_method_in_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = squeeze(capsys.readouterr().out)
    for name, function in [("lape", methods.lape), ("lape-variant", methods.lape_variant),
                           ("entropy-lambda", methods.EntropyLambda), ("autosweep", methods.EntropyLambda.autosweep),
                           ("act-prob-zero", methods.act_prob_zero), ("act-prob-90p", methods.act_prob_90p),
                           ("coverage", methods.coverage), ("localizer", methods.localizer),
                           ("random", methods.random_control)]:
        line = function.__doc__.strip().splitlines()[0]
        assert len(line) > 30 and squeeze(f"{name} {line}") in text, name


def _example(cls, f: dataclasses.Field):
    """A valid value of the field, unlike its default: ``(YAML value, flag words, parsed value)``."""
    hint = typing.get_type_hints(cls, include_extras=True)[f.name]
    text = str(hint)
    if "Literal" in text:
        while typing.get_origin(hint) is not typing.Literal:  # X | None
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        choices = typing.get_args(hint)
        value = next((c for c in reversed(choices) if c != f.default), choices[0])  # one choice: itself
        return value, [value], value
    if hint is bool:
        return True, [], True
    if "list" in text:
        return ["from-yaml"], ["from-flag"], ["from-flag"]
    if "_memory" in text:
        return "2GiB", ["50%"], "50%"
    if "positive" in text:
        return 3, ["5"], 5
    if "float" in text:
        return 0.25, ["0.5"], 0.5
    if "int" in text:
        return 3, ["5"], 5
    return "from-yaml", ["from-flag"], "from-flag"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_config_file_gives_every_field_and_flags_override_it(name, tmp_path):
    path, cls = COMMANDS[name]
    fields = dataclasses.fields(cls)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({f.name.rstrip("_").replace("_", "-"): _example(cls, f)[0] for f in fields}),
                      encoding="utf-8")
    _, options = parse(build_parser(), [*path, "--config", str(config)])
    for f in fields:
        assert getattr(options, f.name) == _example(cls, f)[0], (name, f.name)
    positional = getattr(cls, "POSITIONAL", ())
    for f in fields:  # each flag given on the command line wins over the file
        yaml_value, words, flag_value = _example(cls, f)
        if isinstance(yaml_value, bool):
            continue
        given = [] if f.name in positional else [flag(f.name), *words]
        places = [words[0] if p == f.name else str(getattr(options, p)) for p in positional]
        _, again = parse(build_parser(), [*path, "--config", str(config), *given, *places])
        assert getattr(again, f.name) == flag_value, (name, f.name)


def test_config_reaches_the_command_and_a_flag_overrides_it(tmp_path, capsys):
    """Through ``main``, as a user runs it: the mask path comes from the file, then from the flag."""
    config = tmp_path / "c.yaml"
    config.write_text(f"mask: {tmp_path / 'from-yaml.npz'}\nout: {tmp_path / 'out'}\n", encoding="utf-8")
    assert main(["report", "--config", str(config)]) == 2
    assert "from-yaml.npz" in capsys.readouterr().err
    assert main(["report", "--config", str(config), "--mask", str(tmp_path / "from-flag.npz")]) == 2
    err = capsys.readouterr().err
    assert "from-flag.npz" in err and "from-yaml" not in err


def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lsn: error: "), err
    return err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_config_refuses_unknown_keys_and_non_utf8_in_one_line(name, tmp_path, capsys):
    path, _ = COMMANDS[name]
    config = tmp_path / "c.yaml"
    config.write_text("seq_length: 64\n", encoding="utf-8")
    assert "unknown option 'seq_length'" in one_line_error([*path, "--config", str(config)], capsys)
    config.write_bytes("model: caf\u00e9\n".encode("latin-1"))
    assert "not UTF-8 text" in one_line_error([*path, "--config", str(config)], capsys)
    config.write_text("- a list\n", encoding="utf-8")
    assert "must be a mapping" in one_line_error([*path, "--config", str(config)], capsys)


def test_config_checks_values_as_the_flags_do(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    for bad in ("seq-len: 0", "seq-len: many", "backend: tpu", "no-ray: yes please", "corpus: {a: 1}"):
        config.write_text(bad + "\n", encoding="utf-8")
        one_line_error(["harvest", "--config", str(config)], capsys)
    config.write_text("model: tiny:llama\n", encoding="utf-8")
    assert "--corpus is required" in one_line_error(["harvest", "--config", str(config)], capsys)


def test_old_site_flag_is_a_hidden_alias_of_unit(capsys):
    _, options = parse(build_parser(), ["harvest", "--model", "m", "--corpus", "c", "--store", "s",
                                        "--site", "residual"])
    assert options.unit == "residual" and options.site_module is None
    _, options = parse(build_parser(), ["harvest", "--model", "m", "--corpus", "c", "--store", "s",
                                        "--site-module", "model.layers.{layer}.mlp.act_fn"])
    assert options.unit == "mlp" and options.site_module == "model.layers.{layer}.mlp.act_fn"
    with pytest.raises(SystemExit):
        main(["harvest", "--help"])
    out = capsys.readouterr().out
    assert "--unit" in out and "--site " not in out and "--site\n" not in out


def _imports(path: Path) -> set[str]:
    """The top-level packages ``path`` imports (at any depth of the module, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", LAYERS[:-1])
def test_no_package_imports_one_above_it(package):
    above = set(LAYERS[LAYERS.index(package) + 1:])
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        if path.name == "__main__.py":  # an entry point, never imported: python -m harvester runs lsn
            continue
        assert not _imports(path) & above, f"{path.relative_to(ROOT)} imports {_imports(path) & above}"


@pytest.mark.parametrize("module", ["harvester.cli", "analysis.cli", "jobs.cli", "lsn.cli"])
def test_each_layer_imports_alone_and_loads_nothing_above_it(module):
    package = module.split(".")[0]
    above = list(LAYERS[LAYERS.index(package) + 1:])
    probe = (f"import sys, {module}; "
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({above!r})))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_python_m_harvester_is_lsn():
    proc = subprocess.run([sys.executable, "-m", "harvester", "analyze", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "localizer" in proc.stdout and proc.stdout.startswith("usage: lsn analyze")
