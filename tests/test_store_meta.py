"""The store's metadata (``harvester.store.StoreAttrs``): one schema with a JSON round trip, checked on
every read as a user meets it (a hand-edited ``zarr.json``), the shard digest, and an import racing a
harvest for one new store path (real processes)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import xarray as xr
import zarr

import harvester
from analysis.importers import import_published
from lsn.cli import main
from harvester.errors import HarvestError
from harvester.store import ShardDigest, StoreAttrs, fingerprint_sha256, read_attrs
from tests.test_import import write_rucaibox
from tests.helpers import harvest
from tests.test_integrity import analyze, summary


def on_disk(store: Path) -> dict:
    """The ``lsn`` attributes as they are in the store's ``zarr.json``."""
    return json.loads((store / "zarr.json").read_text())["attributes"]["lsn"]


def edit_on_disk(store: Path, change) -> None:
    """Edit the attributes by hand, as a user with a text editor would: ``change(lsn)`` in place."""
    node = json.loads((store / "zarr.json").read_text())
    change(node["attributes"]["lsn"])
    (store / "zarr.json").write_text(json.dumps(node, indent=2))


# -- the round trip -------------------------------------------------------------------------------
def test_a_harvested_store_reads_as_typed_attributes_and_writes_back_the_same_json(pristine):
    raw = on_disk(pristine)
    attrs = read_attrs(pristine)
    assert attrs.to_dict() == raw
    assert StoreAttrs.from_dict(attrs.to_dict(), pristine) == attrs
    tokens = tuple(int(n) for n in xr.open_zarr(pristine)["tokens"].values)
    assert attrs.complete is True and attrs.version == 2
    assert attrs.corpus.groups == ("en", "de") and attrs.corpus.tokens_per_group == tokens
    assert attrs.corpus.tokens == sum(tokens) and attrs.totals.tokens == tokens
    assert attrs.corpus.shards == len(list((pristine / "shards" / "done" / "c").iterdir()))
    assert (attrs.model.id, attrs.model.architecture, attrs.model.layers, attrs.model.width) == \
        ("tiny:llama", "llama", 3, 128)
    assert attrs.settings.variables == ["active", "act_sum", "act_sqsum"]
    # the read-only view of the JSON layout (what lsn verify and older code index)
    assert attrs["meta"]["corpus"]["groups"] == ["en", "de"] and attrs.get("complete") is True


def test_the_fingerprint_digest_is_the_one_the_harvest_recorded(pristine):
    """The digest of the fingerprint as read equals the one the harvest wrote into its token manifests
    (computed from the fingerprint it built, before any store existed), and sha256 of its canonical JSON."""
    fingerprint = read_attrs(pristine).fingerprint
    recorded = json.loads((pristine / "tokens" / "00000.json").read_text())["settings"]["fingerprint_sha256"]
    canonical = hashlib.sha256(json.dumps(on_disk(pristine)["fingerprint"], sort_keys=True).encode()).hexdigest()
    assert fingerprint_sha256(fingerprint) == recorded == canonical


def old_harvest_meta(fp: dict, corpus_results: dict) -> dict:
    """The metadata as driver.py built it before StoreAttrs: the fingerprint repeated, the model's shape
    and architectures, the specs and versions; the reduce then added the corpus results."""
    meta = {"model": {**fp["model"], "architectures": ["LlamaForCausalLM"]}, "tokenizer": fp["tokenizer"],
            "corpus": {**fp["corpus"], "specs": ["sample:docs=20,langs=en+de"]}, "settings": fp["settings"],
            "versions": {"lsn-harvester": harvester.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}
    meta["model"].update(layers=3, width=128)
    meta["corpus"].update(corpus_results)
    return meta


def test_a_harvest_writes_the_layout_it_always_wrote(pristine):
    raw = on_disk(pristine)
    results = {k: raw["meta"]["corpus"][k] for k in ("digest", "windows", "truncated_tokens", "truncated_documents",
                                                     "truncated_tokens_per_group", "truncated_documents_per_group",
                                                     "boundaries_per_group", "boundary_mismatches_per_group")}
    tokens = [int(n) for n in xr.open_zarr(pristine)["tokens"].values]
    results.update(tokens_per_group=tokens, tokens=sum(tokens), shards=raw["totals"]["shards"])
    assert raw["meta"] == old_harvest_meta(raw["fingerprint"], results)
    assert set(raw) == {"format", "format_version", "fingerprint", "meta", "complete", "created", "totals"}


def old_import_attrs(src: Path, tag: str, groups: list[str], tokens: list[int], files: list[dict]) -> dict:
    """The attributes as analysis/importers.py built them before StoreAttrs."""
    fingerprint = {
        "model": {"id": None, "revision": None, "weights": None, "architecture": None, "site": None,
                  "unit": None, "dtype": None, "device": None, "device_map": None},
        "tokenizer": {"name": None, "vocab_size": None, "eos_token_id": None, "sha256": None},
        "corpus": {"spec": f"import:rucaibox:{src}", "groups": groups, "streams": [],
                   "source": [{k: f[k] for k in ("file", "size", "sha256")} for f in files], "options": None},
        "settings": {"backend": None, "seq_len": None, "batch_size": None, "shard_tokens": None,
                     "stats": ["active"], "hist_edges": None, "pooling": "token"},
    }
    meta = {
        "model": {**fingerprint["model"], "architectures": [], "layers": 3, "width": 5},
        "tokenizer": fingerprint["tokenizer"],
        "corpus": {**fingerprint["corpus"], "specs": [fingerprint["corpus"]["spec"]], "tokens_per_group": tokens,
                   "tokens": sum(tokens), "shards": 0, "digest": None},
        "settings": fingerprint["settings"],
        "versions": {"lsn-harvester": harvester.__version__, "torch": torch.__version__},
        "imported": {"format": "rucaibox", "tag": tag, "files": files},
    }
    return {"format": "lsn-harvester-store", "format_version": 2, "fingerprint": fingerprint, "meta": meta,
            "complete": True, "totals": {"shards": 0, "shards_sha256": hashlib.sha256(b"[]").hexdigest(),
                                         "tokens": tokens}}


def test_an_import_writes_the_layout_it_always_wrote(tmp_path):
    data = write_rucaibox(tmp_path / "src")
    import_published("rucaibox", tmp_path / "src", tmp_path / "store")
    raw = on_disk(tmp_path / "store")
    groups = ["en", "zh", "fr"]  # test_import's languages in LAPE's published order
    files = raw["meta"]["imported"]["files"]
    assert [f["group"] for f in files] == groups and all(len(f["sha256"]) == 64 for f in files)
    created = raw.pop("created")
    assert created.endswith("+00:00")
    assert raw == old_import_attrs(tmp_path / "src", "llama-7b", groups, [data[g][0] for g in groups], files)


def test_unknown_keys_are_kept_and_older_layouts_read(store, capsys):
    """A newer lsn's extra keys survive a read and a write; a store from before ``format_version``,
    ``weights_sampled``, ``versions``, ``specs`` and ``windows`` still opens, and writes back as it was."""
    def change(lsn):
        lsn["future"] = {"x": 1}
        lsn["meta"]["corpus"]["future"] = [1, 2]
        lsn["fingerprint"]["settings"]["future"] = "y"
        lsn["meta"]["settings"]["future"] = "y"
        for key in ("format_version",):
            del lsn[key]
        for part in ("fingerprint", "meta"):
            del lsn[part]["model"]["weights_sampled"]
        for key in ("versions",):
            del lsn["meta"][key]
        for key in ("specs", "windows", "truncated_documents"):
            del lsn["meta"]["corpus"][key]

    edit_on_disk(store, change)
    attrs = read_attrs(store)
    assert attrs.to_dict() == on_disk(store)
    assert attrs.version == 1 and attrs.corpus.specs is None and attrs.model.weights_sampled is None
    assert attrs.extra == {"future": {"x": 1}} and attrs.corpus.extra == {"future": [1, 2]}
    assert main(summary(store)) == 0
    out = capsys.readouterr()
    assert "en " in out.out and "format version 1" in out.err


# -- malformed attributes, as a user meets them ---------------------------------------------------
def put(path: str, value):
    """An edit setting the dotted ``path`` of the attributes to ``value`` (``...`` deletes it)."""
    def change(lsn):
        *parents, last = path.split(".")
        node = lsn
        for key in parents:
            node = node[key]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return change


MALFORMED = [
    (put("meta.corpus.groups", 5), "meta.corpus.groups: expected a list, found an integer 5"),
    (put("meta.corpus.groups", ["en", 7]), "meta.corpus.groups[1]: expected a string, found an integer 7"),
    (put("meta.corpus.groups", ["en", "en"]), "meta.corpus.groups: names group 'en' twice"),
    (put("meta.corpus.groups", ["de", "en"]), "meta.corpus.groups: differs from fingerprint.corpus.groups"),
    (put("meta.model.layers", ...), "meta.model.layers: is missing"),
    (put("meta.model.width", "128"), 'meta.model.width: expected an integer, found a string "128"'),
    (put("meta.model.layers", 0), "meta.model.layers: is 0; it must be at least 1"),
    (put("meta.corpus.tokens_per_group", [-5, 3]), "meta.corpus.tokens_per_group[0]: is negative (-5)"),
    (put("meta.corpus.tokens_per_group", [5]), "meta.corpus.tokens_per_group: has 1 entries for 2 groups"),
    (put("totals.tokens", [1, -1]), "totals.tokens[1]: is negative (-1)"),
    (put("totals", []), "totals: expected an object, found a list"),
    (put("complete", "yes"), 'complete: expected true or false, found a string "yes"'),
    (put("meta.settings.stats", ["active", "bogus"]),
     "meta.settings.stats[1]: unknown statistic 'bogus' (known: active, nonzero, sum, sqsum, abs, hist, batch_quantile, quantile_batches, above)"),
    (put("meta", None), "meta: expected an object, found null"),
    (put("fingerprint.model", ...), "fingerprint.model: is missing"),
    (put("format_version", "2"), 'format_version: expected an integer, found a string "2"'),
]


@pytest.mark.parametrize("command", [summary, analyze, harvest])
@pytest.mark.parametrize("change,message", MALFORMED, ids=[m.split(":")[0] + "-" + str(i)
                                                           for i, (_, m) in enumerate(MALFORMED)])
def test_malformed_metadata_is_one_line(store, capsys, command, change, message):
    edit_on_disk(store, change)
    before = (store / "zarr.json").read_bytes()
    assert main(command(store)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lsn: error: store {store} has malformed metadata: {message}", err
    assert (store / "zarr.json").read_bytes() == before  # nothing was rewritten


def test_an_lsn_value_that_is_not_an_object_is_not_a_store(store, capsys):
    node = json.loads((store / "zarr.json").read_text())
    node["attributes"]["lsn"] = ["not", "attributes"]
    (store / "zarr.json").write_text(json.dumps(node))
    assert main(summary(store)) == 2
    assert capsys.readouterr().err.strip() == f"lsn: error: {store} is a Zarr store but not an lsn-harvester store"


def test_attributes_built_wrong_are_refused_before_a_store_is_made(tmp_path):
    fingerprint = {"model": {}, "tokenizer": {}, "corpus": {"spec": "x", "groups": ["a"]},
                   "settings": {"stats": ["active", "hist"]}}
    with pytest.raises(HarvestError, match="malformed metadata: meta.settings.hist_edges: the hist statistic"):
        StoreAttrs.new(fingerprint, layers=2, width=4, specs=["x"])


# -- the shard digest -----------------------------------------------------------------------------
def test_shard_digests_hash_the_bytes_they_always_hashed(pristine):
    """Each finished shard's stored digest equals sha256 computed as write_shard computed it before
    ShardDigest (its rows of groups with tokens, group then variable, then its int64 tokens), and
    ShardDigest fed the same rows gives it too."""
    root = zarr.open_group(str(pristine), mode="r")
    variables = read_attrs(pristine).settings.variables
    done = [int(p.name) for p in (pristine / "shards" / "done" / "c").iterdir()]
    assert len(done) >= 4
    for index in done:
        tokens = root["shards/tokens"][index]
        reference, digest = hashlib.sha256(), ShardDigest()
        for g in range(len(tokens)):
            if tokens[g] > 0:
                for var in variables:
                    row = root[f"shards/{var}"][index, g]
                    reference.update(np.ascontiguousarray(row).tobytes())
                    digest.add(row)
        reference.update(np.asarray(tokens, dtype=np.int64).tobytes())
        stored = bytes(root["shards/digest"][index])
        assert reference.digest() == stored == digest.digest(tokens), index


# -- an import and a harvest into one new path ----------------------------------------------------
def lsn(*argv: str) -> list[str]:
    return [sys.executable, "-m", "harvester", *argv]


def wait_for_lease(store: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until ``proc`` holds the lease of ``store`` (its generation file is there)."""
    lease = store.parent / f".{store.name}.lease"
    deadline = time.monotonic() + timeout
    while not list(lease.glob("[0-9]*.json")):
        assert proc.poll() is None, f"exited {proc.returncode} before taking the lease"
        assert time.monotonic() < deadline, "the lease never appeared"
        time.sleep(0.002)


def test_an_import_into_a_store_being_harvested_is_refused(tmp_path):
    write_rucaibox(tmp_path / "src")
    store = tmp_path / "S"
    importing = lsn("import", "--format", "rucaibox", "--src", str(tmp_path / "src"), "--store", str(store))
    harvesting = subprocess.Popen(lsn(*harvest(store)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lease(store, harvesting)
        refused = subprocess.run(importing, capture_output=True, text=True, timeout=300)
        out, err = harvesting.communicate(timeout=300)
    finally:
        if harvesting.poll() is None:
            harvesting.kill()
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(f"lsn: error: store {store} is being written by another")
    errors = [line for line in refused.stderr.splitlines() if not line.startswith("lsn: languages in the study")]
    assert len(errors) == 1, refused.stderr  # one line, after the import's note on the languages it read
    assert harvesting.returncode == 0, err
    attrs = read_attrs(store)
    assert attrs.complete and attrs.meta.imported is None and attrs.corpus.groups == ("en", "de")
    again = subprocess.run(importing, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_harvest_into_a_store_being_imported_is_refused(tmp_path):
    """The import is stopped (SIGSTOP) while it holds the lease, mid-write; the harvest started then is
    refused, and the import, continued, finishes its store alone."""
    write_rucaibox(tmp_path / "src")
    store = tmp_path / "S"
    importing = subprocess.Popen(lsn("import", "--format", "rucaibox", "--src", str(tmp_path / "src"),
                                     "--store", str(store)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lease(store, importing)
        importing.send_signal(signal.SIGSTOP)
        assert list((tmp_path / ".S.lease").glob("[0-9]*.json")), "the import released its lease before it was stopped"
        refused = subprocess.run(lsn(*harvest(store)), capture_output=True, text=True, timeout=300)
    finally:
        importing.send_signal(signal.SIGCONT)
    out, err = importing.communicate(timeout=300)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(f"lsn: error: store {store} is being written by another")
    assert importing.returncode == 0, err
    attrs = read_attrs(store)
    assert attrs.complete and attrs.meta.imported["format"] == "rucaibox"
    assert attrs.corpus.groups == ("en", "zh", "fr")  # LAPE's published order
    assert not (tmp_path / ".S.lease").exists()
