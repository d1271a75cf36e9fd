"""What a new user meets in the first hour (issue 16, item 10): every bad input is one line from the
real CLI, never a traceback or a hang, and nothing is written before the input is refused."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from harvester.errors import HarvestError
from harvester.options import positive as _positive
from harvester.windows import pack
from lsn.cli import build_parser, main
from tests.conftest import write_text_corpus

FAST = ["--seq-len", "64", "--shard-tokens", "512", "--no-ray", "--no-progress"]


def one_line(capsys, argv: list[str], pattern: str) -> str:
    """``lsn ARGV`` exits 2 with one line on stderr that holds ``pattern``, and no traceback."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err
    return err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``en.txt`` and ``a=b.txt``: a group name that holds '='."""
    path = write_text_corpus(tmp_path_factory.mktemp("first-hour") / "text", langs=("en", "de"), docs=16)
    (path / "de.txt").rename(path / "a=b.txt")
    return path


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory):
    """A store of ``active`` counts only (no ``act_sum``), and a LAPE mask of it."""
    root = tmp_path_factory.mktemp("store")
    assert main(["harvest", "--model", "tiny:llama", "--corpus", f"text:{corpus}", "--store", str(root / "s"),
                 "--stats", "active", *FAST]) == 0
    assert main(["analyze", "lape", "--store", str(root / "s"), "--out", str(root / "m.npz")]) == 0
    return root


def subcommands(parser, path=()):
    """``(command path, parser)`` for every (sub)command of ``lsn``."""
    yield path, parser
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield from subcommands(sub, (*path, name))


def test_every_count_flag_refuses_zero_and_negatives(capsys):
    """Each integer flag that counts something (--seq-len, --batch-size, --steps, ...), in every command."""
    checked = []
    for path, parser in subcommands(build_parser()):
        for action in parser._actions:  # noqa: SLF001
            if action.type is _positive:
                for value in ("0", "-3"):
                    one_line(capsys, [*path, action.option_strings[0], value], "must be a positive integer")
                checked.append(" ".join([*path, action.option_strings[0]]))
    assert {"harvest --batch-size", "intervene ppl --seq-len", "intervene ppl --batch-size", "finetune --batch-size",
            "finetune --steps", "demo --actors"} <= set(checked)


def test_seq_len_0_is_refused_not_a_hang(tmp_path):
    """Before: ``pack`` looped forever. A subprocess, as the user runs it, with a deadline."""
    proc = subprocess.run([sys.executable, "-m", "harvester", "intervene", "ppl", "--model", "tiny:llama", "--mask",
                           str(tmp_path / "m.npz"), "--corpus", "sample", "--out", str(tmp_path / "out"),
                           "--seq-len", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--seq-len: must be a positive integer, not 0" in proc.stderr
    with pytest.raises(HarvestError, match="--seq-len must be positive"):  # and from Python
        next(pack([([1, 2, 3], [0, 0, 0])], 0))
    assert not (tmp_path / "out").exists()


def test_a_group_name_holding_equals_is_analysable(store, capsys):
    """``a=b`` is its own group in --langs; ``NAME=G1+G2`` still sums groups, including such a group."""
    out = store / "eq.npz"
    assert main(["analyze", "lape", "--store", str(store / "s"), "--out", str(out), "--langs", "a=b,en,both=a=b+en"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: lape, a=b ")
    from analysis.masks import Mask

    assert Mask.load(out).languages == ["a=b", "en", "both"]


def test_mode_mean_without_act_sum(store, capsys, tmp_path):
    one_line(capsys, ["intervene", "ppl", "--model", "tiny:llama", "--mask", str(store / "m.npz"), "--corpus", "sample",
                      "--out", str(tmp_path / "p"), "--mode", "mean", "--no-ray", "--no-progress", "--seq-len", "32"],
             "--mode mean needs activation sums")


def test_bad_text_corpora_are_refused_before_a_store(tmp_path, capsys):
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "en.txt").write_text("fine\n")
    (latin / "fr.txt").write_bytes("une ligne\n".encode() + "café au lait\n".encode("latin-1"))
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    (nameless / ".txt").write_text("a document\n")
    folder = tmp_path / "folder"
    (folder / "fr.txt").mkdir(parents=True)
    for corpus, pattern in [(latin, f"{latin / 'fr.txt'}:2: not UTF-8 text"),
                            (nameless, "has no language name: name it {lang}.txt"),
                            (folder, f"corpus entry {folder / 'fr.txt'} is not a file")]:
        store = tmp_path / f"store-{corpus.name}"
        one_line(capsys, ["harvest", "--model", "tiny:llama", "--corpus", f"text:{corpus}", "--store", str(store),
                          *FAST], pattern)
        assert not store.exists()


def test_prompts_and_task_data_that_are_not_utf8(store, tmp_path, capsys):
    bad = "caf\xe9\n".encode("latin-1")
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"lang": "en", "prompt": "the cat"}\n{"lang": "en", "prompt": "' + bad[:-1] + b'"}\n')
    one_line(capsys, ["intervene", "generate", "--model", "tiny:llama", "--mask", str(store / "m.npz"), "--prompts",
                      str(prompts), "--out", str(tmp_path / "g"), "--no-ray"], f"{prompts}:2: not UTF-8 text")
    (tmp_path / "xnli" / "en").mkdir(parents=True)
    (tmp_path / "xnli" / "en" / "train.jsonl").write_bytes(bad)
    one_line(capsys, ["finetune", "--model", "tiny:llama", "--mask", str(store / "m.npz"), "--lang", "en", "--task",
                      "xnli", "--data", str(tmp_path / "xnli"), "--out", str(tmp_path / "ft"), "--no-ray", "--steps", "1"],
             "train.jsonl:1: not UTF-8 text")
    assert not any((tmp_path / name).exists() for name in ("g", "ft", "r.npz", "p"))


def test_a_config_file_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes("model: tiny:llama\n# café\n".encode("latin-1"))
    one_line(capsys, ["harvest", "--config", str(config), "--corpus", "sample", "--store", str(tmp_path / "s")],
             f"cannot read config {config}: not UTF-8 text")
    assert not (tmp_path / "s").exists()


def test_a_5000_character_language_in_finetune(store, tmp_path, capsys):
    """A language name too long to be a file name, from a mask imported with such a name."""
    published = tmp_path / "mask.pt"
    assert main(["mask", "export", str(store / "m.npz"), str(published)]) == 0
    long_mask = tmp_path / "long.npz"
    assert main(["mask", "import", str(published), str(long_mask), "--langs", f"{'x' * 5000},en"]) == 0
    capsys.readouterr()
    one_line(capsys, ["finetune", "--model", "tiny:llama", "--mask", str(long_mask), "--lang", "x" * 5000,
                      "--task", "clm", "--data", "sample", "--out", str(tmp_path / "ft"), "--no-ray", "--steps", "1"],
             "is too long to name a file")
    assert not (tmp_path / "ft").exists()


def test_outputs_where_a_file_or_directory_is_in_the_way(store, tmp_path, capsys):
    a_file, a_dir, empty = tmp_path / "file.csv", tmp_path / "dir", tmp_path / "empty.npz"
    a_file.write_text("keep me\n")
    a_dir.mkdir()
    empty.write_bytes(b"")
    mask, s = str(store / "m.npz"), str(store / "s")
    one_line(capsys, ["analyze", "lape", "--store", s, "--out", str(a_dir)], f"--out {a_dir} is a directory")
    one_line(capsys, ["analyze", "lape", "--store", s, "--out", str(tmp_path / "m.npz"), "--report", str(a_file / "r")],
             f"--report {a_file / 'r'}: {a_file} is a file")
    one_line(capsys, ["mask", "export", mask, str(a_dir)], f"{a_dir} is a directory")
    one_line(capsys, ["report", "--mask", mask, "--out", str(a_file)], f"--out {a_file}: {a_file} is a file")
    one_line(capsys, ["report", "--mask", str(empty), "--out", str(a_dir)], "is not an lsn mask file")
    one_line(capsys, ["report", "--mask", str(a_dir), "--out", str(a_dir)], f"mask {a_dir} is a directory")
    one_line(capsys, ["intervene", "ppl", "--model", "tiny:llama", "--mask", mask, "--corpus", "sample", "--out",
                      str(a_file), "--no-ray", "--seq-len", "32"], f"--out {a_file}: {a_file} is a file")
    assert a_file.read_text() == "keep me\n" and not any(a_dir.iterdir()) and not (tmp_path / "m.npz").exists()


def test_out_of_range_values(store, tmp_path, capsys):
    mask, s = str(store / "m.npz"), str(store / "s")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"lang": "en", "prompt": "the cat"}\n')
    generate = ["intervene", "generate", "--model", "tiny:llama", "--mask", mask, "--prompts", str(prompts),
                "--out", str(tmp_path / "g"), "--no-ray"]
    one_line(capsys, [*generate, "--sample", "--temperature", "0"], "--temperature must be positive")
    one_line(capsys, [*generate, "--top-p", "2"], "--top-p must lie in (0, 1]")
    one_line(capsys, ["finetune", "--model", "tiny:llama", "--mask", mask, "--lang", "en", "--task", "clm", "--data",
                      "sample", "--out", str(tmp_path / "ft"), "--lr", "0"], "--lr must be positive")
    one_line(capsys, ["finetune", "--model", "tiny:llama", "--mask", mask, "--lang", "en", "--task", "clm", "--data",
                      "sample", "--out", str(tmp_path / "ft"), "--seq-len", "1"], "leaves no token to predict")
    one_line(capsys, ["analyze", "act-prob-90p", "--store", s, "--out", str(tmp_path / "x.npz"), "--percent", "200"],
             "--percent must lie in [0, 100]")
    one_line(capsys, ["analyze", "autosweep", "--store", s, "--eps", "0"], "--eps must be positive")
    one_line(capsys, ["analyze", "lape", "--store", s, "--out", str(tmp_path / "x.npz"), "--bar-ratio", "0"],
             "--bar-ratio is a quantile and must lie in (0, 1]")
    one_line(capsys, ["analyze", "random", "--mask", mask, "--out", str(tmp_path / "r.npz"), "--seed", "-1"],
             "--seed must be 0 or more")
    one_line(capsys, ["intervene", "ppl", "--model", "tiny:llama", "--mask", mask, "--corpus", "sample", "--out",
                      str(tmp_path / "p"), "--seed", "-1", "--no-ray", "--seq-len", "32"], "--seed must be 0 or more")
    assert not any((tmp_path / name).exists() for name in ("g", "ft", "r.npz", "p"))


def test_vllm_memory_is_checked_before_anything(tmp_path, capsys):
    """Engine-free: the flag's value, and its backend; YAML may give the GiB as a number."""
    harvest = ["harvest", "--model", "tiny:llama", "--corpus", "sample", "--store", str(tmp_path / "s"), *FAST]
    one_line(capsys, [*harvest, "--vllm-memory", "0"], "argument --vllm-memory: give GiB of KV cache")
    one_line(capsys, [*harvest, "--vllm-memory", "120%"], "argument --vllm-memory: give GiB of KV cache")
    one_line(capsys, [*harvest, "--vllm-memory", "2"], "--vllm-memory is for --backend vllm")
    config = tmp_path / "c.yaml"
    config.write_text("vllm-memory: 4\n")
    one_line(capsys, [*harvest, "--config", str(config)], "--vllm-memory is for --backend vllm")
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def short_embedding(tmp_path_factory):
    """``tiny:llama``'s files with an embedding of 100 rows for its 1,024-token tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from harvester.tiny import tiny_path

    path = tmp_path_factory.mktemp("short") / "model"
    shutil.copytree(tiny_path("tiny:llama"), path)
    config = AutoConfig.from_pretrained(path)
    config.vocab_size = 100
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_an_embedding_smaller_than_the_tokenizer(short_embedding, store, corpus, tmp_path, capsys):
    """Was an IndexError in the first shard; now one line before a store exists, in every command."""
    one_line(capsys, ["harvest", "--model", str(short_embedding), "--corpus", f"text:{corpus}",
                      "--store", str(tmp_path / "s"), *FAST], "has 1024 tokens but the model's embedding has 100 rows")
    assert not (tmp_path / "s").exists()
    assert main(["intervene", "ppl", "--model", str(short_embedding), "--mask", str(store / "m.npz"),
                 "--corpus", f"text:{corpus}", "--out", str(tmp_path / "ppl"), "--allow-other-model",
                 "--no-ray", "--no-progress", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err  # the note --allow-other-model asks for, then the error
    assert err.strip().splitlines()[-1].endswith("use the model's own tokenizer, or resize its embedding"), err
    assert "Traceback" not in err and not (tmp_path / "ppl").exists()


def test_a_value_that_starts_with_a_minus(tmp_path):
    """``--hist-edges -1:4:100`` as the README writes it (argparse took it for a flag)."""
    assert main(["harvest", "--model", "tiny:llama", "--corpus", "sample:docs=2,langs=en", "--store",
                 str(tmp_path / "s"), "--stats", "active,hist", "--hist-edges", "-1:4:100", *FAST]) == 0
    import zarr

    assert zarr.open_group(str(tmp_path / "s"), mode="r")["hist"].shape[-1] == 100 + 2


def test_json_nested_too_deeply_is_one_line(tmp_path, capsys):
    """``[[[[...`` 200,000 deep was a RecursionError traceback in every reader of JSON input."""
    deep = "[" * 200_000
    (tmp_path / "deep.json").write_text(deep, encoding="utf-8")
    (tmp_path / "deep.jsonl").write_text(deep + "\n", encoding="utf-8")
    for spec in (f"lna:{tmp_path / 'deep.json'}", f"instruct:{tmp_path / 'deep.jsonl'}"):
        one_line(capsys, ["harvest", "--model", "tiny:llama", "--corpus", spec, "--store", str(tmp_path / "s"),
                          *FAST], "nested too deeply")
    assert not (tmp_path / "s").exists()
