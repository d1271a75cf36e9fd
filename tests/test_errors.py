"""Bad input: a one- or two-line error, a non-zero exit, no traceback, and no store data lost."""

import subprocess
import sys

import pytest
from transformers import AutoConfig

from lsn.cli import main
from tests.helpers import tree_digest

BASE = ["--seq-len", "40", "--shard-tokens", "300", "--no-ray", "--no-progress"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "harvester", *args], capture_output=True, text=True, timeout=300)


def assert_clean_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "Traceback" not in proc.stderr, proc.stderr
    assert pattern in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A non-causal model (BERT) and a causal architecture with no adapter (Falcon), saved locally."""
    root = tmp_path_factory.mktemp("models")
    for name, kwargs in {"bert": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
                         "falcon": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)}.items():
        AutoConfig.for_model(name, vocab_size=64, **kwargs).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def good_store(tmp_path_factory, text_corpus):
    path = tmp_path_factory.mktemp("good") / "store"
    assert main(["harvest", "--model", "tiny:llama", "--corpus", f"text:{text_corpus}", "--store", str(path), *BASE]) == 0
    return path


def cases(tmp, corpus, models):
    from tests import fixtures

    ec40 = fixtures.write_ec40(tmp / "ec40", langs=("fr",), n=3)
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text('{"lang": "en", "prompt": "a", "response": "b"}\n{"lang": "en", "prompt": "a"\n')
    bad_csv = tmp / "bad.csv"
    bad_csv.write_text("text,condition\nthe cat sat,S\nno condition here\n")
    empty_dir = tmp / "empty"
    empty_dir.mkdir(exist_ok=True)
    blank = tmp / "blank"
    blank.mkdir(exist_ok=True)
    (blank / "de.txt").write_text("\n  \n")
    a_file = tmp / "file"
    a_file.write_text("x")
    control = tmp / "control"
    control.mkdir(exist_ok=True)
    (control / "de\nfr.txt").write_text("a document\n")  # a group name that cannot be shown on one line
    empty_lang = tmp / "empty-lang.jsonl"
    empty_lang.write_text('{"lang": "", "prompt": "a", "response": "b"}\n')
    ok = ["--model", "tiny:llama", "--corpus", f"text:{corpus}"]
    return {
        "missing model path": (["--model", str(tmp / "nope"), "--corpus", f"text:{corpus}"], "model path not found"),
        "non-causal model": (["--model", str(models / "bert"), "--corpus", f"text:{corpus}"], "not a causal language model"),
        "unsupported model": (["--model", str(models / "falcon"), "--corpus", f"text:{corpus}"], "unsupported architecture 'falcon'"),
        "hub id, offline": (["--model", "someorg/no-such-model", "--corpus", f"text:{corpus}"], "could not load model config"),
        "unknown built-in": (["--model", "tiny:t5", "--corpus", f"text:{corpus}"], "unknown built-in model"),
        "missing corpus dir": (["--model", "tiny:llama", "--corpus", f"text:{tmp / 'none'}"], "corpus directory not found"),
        "empty corpus dir": (["--model", "tiny:llama", "--corpus", f"text:{empty_dir}"], "has no {lang}.txt files"),
        "empty corpus file": (["--model", "tiny:llama", "--corpus", f"text:{blank}"], "is empty"),
        "unknown corpus kind": (["--model", "tiny:llama", "--corpus", "json:/x"], "unknown corpus kind 'json'"),
        "bad sample option": (["--model", "tiny:llama", "--corpus", "sample:docs=x"], "must be an integer"),
        "unknown direction": (["--model", "tiny:llama", "--corpus", f"ec40:{ec40}", "--pairs", "fr-de"], "fr-de"),
        "unknown language": (["--model", "tiny:llama", "--corpus", f"ec40:{ec40}", "--pairs", "en-xx"], "en-xx"),
        "missing EC40 file": (["--model", "tiny:llama", "--corpus", f"ec40:{ec40}", "--pairs", "en-de"], "en-de"),
        "malformed jsonl": (["--model", "tiny:llama", "--corpus", f"instruct:{bad_jsonl}"], f"{bad_jsonl}:2:"),
        "malformed csv": (["--model", "tiny:llama", "--corpus", f"stimuli:{bad_csv}"], f"{bad_csv}:3:"),
        "colliding groups": (["--model", "tiny:llama", "--corpus", "sample:docs=1", "--corpus", "sample:docs=2"],
                             "comes from both"),
        "control character in a group": (["--model", "tiny:llama", "--corpus", f"text:{control}"],
                                         "holds the control character"),
        "empty language in jsonl": (["--model", "tiny:llama", "--corpus", f"instruct:{empty_lang}"],
                                    "field 'lang' is empty"),
        "store is a file": (ok, "is a file", a_file),
        "seq-len too long": ([*ok, "--seq-len", "100000"], "exceeds the model's maximum of 512"),
        "zero seq-len": ([*ok, "--seq-len", "0"], "--seq-len: must be a positive integer"),
        "negative batch": ([*ok, "--batch-size", "-2"], "--batch-size: must be a positive integer"),
        "zero shard tokens": ([*ok, "--shard-tokens", "0"], "--shard-tokens: must be a positive integer"),
        "zero actors": ([*ok, "--actors", "0"], "--actors: must be a positive integer"),
        "not an integer": ([*ok, "--batch-size", "two"], "is not an integer"),
        "unknown stat": ([*ok, "--stats", "active,median"], "unknown statistic"),
        "bad site": ([*ok, "--site-module", "model.layers.mlp"], "must contain '{layer}'"),
        "missing site": ([*ok, "--site-module", "model.layers.{layer}.nothing"], "no module named"),
    }


def test_bad_inputs(tmp_path, text_corpus, saved_models, capsys):
    for name, case in cases(tmp_path, text_corpus, saved_models).items():
        args, pattern, *store = case
        store = store[0] if store else tmp_path / f"store-{name.replace(' ', '-')}"
        # later flags win in argparse, so the case's own --seq-len etc. override the base ones
        try:
            rc = main(["harvest", "--store", str(store), *BASE, *args])
        except SystemExit as exit_:  # argparse's own errors
            rc = exit_.code
        err = capsys.readouterr().err
        assert_clean_error(subprocess.CompletedProcess([], rc, "", err), pattern)
        if not store.is_file():
            assert not store.exists(), f"{name}: a failed harvest created {store}"


def test_process_exit_code_and_stderr(tmp_path, saved_models):
    """The same contract from a real process: exit status 2, one line, no traceback."""
    assert_clean_error(run_cli("harvest", "--store", str(tmp_path / "s"), "--model", str(saved_models / "bert"),
                               "--corpus", "sample:docs=2", *BASE), "not a causal language model")
    assert_clean_error(run_cli("harvest", "--store", str(tmp_path / "s"), "--model", "tiny:llama",
                               "--corpus", "sample", "--seq-len", "0"), "--seq-len: must be a positive integer")


def test_bad_input_leaves_existing_store_intact(good_store, tmp_path, saved_models):
    before = tree_digest(good_store)
    for args in (["--model", str(saved_models / "bert"), "--corpus", "sample:docs=2"],
                 ["--model", "tiny:llama", "--corpus", f"text:{tmp_path / 'none'}"],
                 ["--model", "tiny:llama", "--corpus", "sample:docs=2", "--seq-len", "9999"]):
        assert main(["harvest", "--store", str(good_store), *BASE, *args]) == 2
    assert tree_digest(good_store) == before


def test_foreign_directory_is_refused(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc = main(["harvest", "--store", str(tmp_path / "mine"), "--model", "tiny:llama", "--corpus", "sample:docs=2", *BASE])
    assert_clean_error(subprocess.CompletedProcess([], rc, "", capsys.readouterr().err), "not an lsn store")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_summary_of_missing_store(tmp_path, capsys):
    rc = main(["summary", "--store", str(tmp_path / "nothing")])
    assert_clean_error(subprocess.CompletedProcess([], rc, "", capsys.readouterr().err), "no store at")


def test_unreachable_cluster_address(tmp_path):
    proc = run_cli("harvest", "--store", str(tmp_path / "s"), "--model", "tiny:llama", "--corpus", "sample:docs=2",
                   "--address", "127.0.0.1:1", "--no-progress")
    assert_clean_error(proc, "cannot reach the Ray cluster at 127.0.0.1:1")
    assert not (tmp_path / "s").exists()
