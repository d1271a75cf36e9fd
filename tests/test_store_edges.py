"""Edges found by an adversarial review: a refused ``--overwrite`` keeps the old store, store paths
written as ``.``, ``..`` or through a link, attributes edited so that they no longer describe the
arrays, and shards marked done that no plan has. Each as a user meets it, through the CLI."""

import json
import shutil
from pathlib import Path

import pytest

from harvester.lease import lease_dir
from lsn.cli import main
from tests.helpers import harvest, tree_digest
from tests.test_integrity import fails_with_one_line
from tests.test_repair import assert_same_store


def edit_attrs(store: Path, change) -> None:
    """Hand-edit the ``lsn`` attributes in ``zarr.json``."""
    path = store / "zarr.json"
    doc = json.loads(path.read_text())
    change(doc["attributes"]["lsn"])
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("late", [["--site-module", "model.layers.{layer}.nope"], ["--device-map", "bogus"],
                                  ["--backend", "vllm", "--device-map", "auto"]],
                         ids=["bad site", "bad device map", "device map with vllm"])
def test_a_refused_overwrite_keeps_the_store(store, capsys, late):
    before = tree_digest(store)
    fails_with_one_line([*harvest(store), "--overwrite", *late], capsys)
    assert tree_digest(store) == before  # nothing was discarded


@pytest.mark.parametrize("where, given", [(".", "."), ("shards", "..")])
def test_overwrite_of_a_store_named_relative_to_the_working_directory(store, pristine, capsys, monkeypatch,
                                                                      where, given):
    monkeypatch.chdir(store / where if where != "." else store)
    assert main([*harvest(Path(given)), "--overwrite"]) == 0, capsys.readouterr().err
    assert "--overwrite: removed store" in capsys.readouterr().err
    assert_same_store(store, pristine, same_attrs=False)
    assert not [p for p in store.parent.iterdir() if ".discarded-" in p.name or ".partial-" in p.name]


def test_a_store_path_through_a_link_or_beside_a_stray_marker_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    fails_with_one_line(harvest(tmp_path / "link"), capsys, "is a symbolic link", "give the real path")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "important.txt").write_text("x")
    (tmp_path / ".mine.creating.json").write_text("{}")
    fails_with_one_line(harvest(tmp_path / "mine"), capsys, "holds 'important.txt'", "left as it is")
    assert (tmp_path / "mine" / "important.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mine.creating.json", "empty", "link", "mine"]


def test_an_empty_directory_given_as_dot_becomes_the_store(tmp_path, capsys, monkeypatch):
    (tmp_path / "new").mkdir()
    monkeypatch.chdir(tmp_path / "new")
    assert main(harvest(Path("."))) == 0, capsys.readouterr().err
    assert main(["verify", str(tmp_path / "new")]) == 0


def drop_sqsum(lsn: dict) -> None:
    for section in (lsn["fingerprint"], lsn["meta"]):
        section["settings"]["stats"] = ["active", "sum"]


def reverse_groups(lsn: dict) -> None:
    for section in (lsn["fingerprint"], lsn["meta"]):
        if "groups" in section["corpus"]:
            section["corpus"]["groups"] = section["corpus"]["groups"][::-1]


def narrow_model(lsn: dict) -> None:
    lsn["meta"]["model"]["width"] //= 2


@pytest.mark.parametrize("edit, words", [(drop_sqsum, "array 'act_sqsum' exists, but the attributes"),
                                         (reverse_groups, "differ from the 'group' coordinate"),
                                         (narrow_model, "differ from the arrays'")],
                         ids=["stats", "groups", "width"])
def test_attributes_that_do_not_describe_the_arrays_are_beyond_repair(store, capsys, edit, words):
    """Before: an edited ``settings.stats`` made verify blame every shard's digest, and --repair unmarked
    them all, leaving a store no harvest could finish; reordered groups put one group's loss on another."""
    edit_attrs(store, edit)
    before = tree_digest(store)
    assert main(["verify", str(store)]) == 2
    assert words in capsys.readouterr().out
    assert main(["verify", "--repair", str(store)]) == 2
    assert "(beyond repair)" in capsys.readouterr().out
    assert tree_digest(store) == before
    if edit is not drop_sqsum:  # readers refuse it too
        fails_with_one_line(["summary", "--store", str(store)], capsys, "groups or model shape differ")


def test_counts_recorded_twice_must_agree(store, capsys):
    edit_attrs(store, lambda lsn: lsn["meta"]["corpus"]["tokens_per_group"].__setitem__(0, 1))
    fails_with_one_line(["summary", "--store", str(store)], capsys, "malformed metadata",
                        "meta.corpus.tokens_per_group: sums to")


def test_a_done_shard_outside_the_plan_is_repaired(store, pristine, capsys):
    """Shard 2's chunks copied to row 3, which no stream plans: before, verify and repair looped forever."""
    for array in ("done", "tokens", "digest", "active", "act_sum", "act_sqsum"):
        src = store / "shards" / array / "c" / "2"
        dst = store / "shards" / array / "c" / "3"
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    assert main(["verify", str(store)]) == 2
    assert "shard 3: marked done, but stream 0's plan has no such shard" in capsys.readouterr().out
    assert main(["verify", "--repair", str(store)]) == 0
    assert main(harvest(store)) == 0
    capsys.readouterr()
    assert main(["verify", str(store)]) == 0, capsys.readouterr().out


def test_one_lease_for_a_store_reached_by_a_file_url_through_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert lease_dir(f"file://{tmp_path}/alias") == lease_dir(str(tmp_path / "real")) \
        == lease_dir(f"file://{tmp_path}/real/")
