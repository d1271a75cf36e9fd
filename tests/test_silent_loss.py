"""Issue 16, items 3 and 4, as a user meets them through the CLI: a refused harvest leaves nothing
behind, ``--overwrite`` discards a store deliberately, and truncation, empty groups and empty masks
are reported instead of passing silently."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from harvester import lease
from harvester.backends.hf import resolve_model
from lsn.cli import main
from harvester.errors import HarvestError
from harvester.store import Store, StoreAttrs, read_attrs
from tests import fixtures

MODEL = "tiny:llama"
FAST = ["--model", MODEL, "--no-ray", "--no-progress", "--shard-tokens", "512", "--batch-size", "4"]
OLD = ["--bos", "none", "--eos-per-example", "--encode", "segments"]
"""The encoding :func:`reference_cut` re-implements (lsn's before --bos, --eos-per-example and --encode)."""


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(root, *inputs):
    """Everything in ``root`` but the test's inputs (stores, leases, partial directories, markers)."""
    return sorted(p.name for p in root.iterdir() if p.name not in inputs)


# -- item 3: nothing left behind by a refused run -------------------------------------------------------------
def test_overlong_stimulus_is_refused_before_a_store_exists(tmp_path, capsys):
    stimuli = fixtures.write_stimuli(tmp_path / "stim.csv", "en", n=4)
    store = tmp_path / "st"
    code, _, err = run(capsys, "harvest", *FAST, "--corpus", f"stimuli:{stimuli}", "--pooling", "last",
                       "--seq-len", 8, "--store", store)
    assert code == 2
    assert err.startswith("lsn: error: document 1 of stream 'S' has ") and "more than --seq-len 8" in err
    assert len(err.strip().splitlines()) == 1
    assert leftovers(tmp_path, "stim.csv") == []  # no store, no lease, no token shards
    code, _, err = run(capsys, "harvest", *FAST, "--corpus", f"stimuli:{stimuli}", "--pooling", "last",
                       "--seq-len", 128, "--store", store)
    assert code == 0, err
    assert read_attrs(store).complete


def test_model_without_tokenizer_files_leaves_nothing(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(resolve_model(MODEL), model)
    for f in model.glob("tokenizer*"):
        f.unlink()
    code, _, err = run(capsys, "harvest", "--model", model, "--corpus", "sample:docs=4,langs=en", "--no-ray",
                       "--no-progress", "--seq-len", 64, "--store", tmp_path / "st")
    assert code == 2 and err.startswith("lsn: error: could not load tokenizer")
    assert leftovers(tmp_path, "model") == []


def _harvest_sample(capsys, store, seq_len, *extra):
    return run(capsys, "harvest", *FAST, "--corpus", "sample:docs=6,langs=en+de", "--seq-len", seq_len,
               "--store", store, *extra)


def test_overwrite_discards_a_store_only_when_the_new_run_can_start(tmp_path, capsys):
    store = tmp_path / "st"
    assert _harvest_sample(capsys, store, 64)[0] == 0
    code, _, err = _harvest_sample(capsys, store, 32)
    assert code == 2 and "holds a different harvest" in err
    stimuli = fixtures.write_stimuli(tmp_path / "stim.csv", "en", n=2)
    code, _, err = run(capsys, "harvest", *FAST, "--corpus", f"stimuli:{stimuli}", "--pooling", "last",
                       "--seq-len", 8, "--store", store, "--overwrite")
    assert code == 2 and "more than --seq-len 8" in err
    assert read_attrs(store).settings.seq_len == 64  # a run refused up front discards nothing
    code, _, err = _harvest_sample(capsys, store, 32, "--overwrite")
    assert code == 0, err
    removed = [line for line in err.splitlines() if "--overwrite" in line]
    assert removed == [f"lsn: --overwrite: removed store {store} (the complete harvest of {MODEL} on "
                       "sample:docs=6,langs=en+de)"]
    assert read_attrs(store).settings.seq_len == 32 and read_attrs(store).complete
    assert leftovers(tmp_path, "st", "stim.csv") == []


def test_overwrite_refuses_a_foreign_directory_and_a_live_harvest(tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    code, _, err = _harvest_sample(capsys, foreign, 64, "--overwrite")
    assert code == 2 and "is a non-empty directory that is not an lsn store" in err
    assert (foreign / "keep.txt").read_text() == "mine"
    store = tmp_path / "st"
    assert _harvest_sample(capsys, store, 64)[0] == 0
    with lease.acquire(str(store)):  # a live harvest (this process) holds it
        code, _, err = _harvest_sample(capsys, store, 32, "--overwrite")
    assert code == 2 and "is being written by another harvest" in err
    assert read_attrs(store).settings.seq_len == 64


def _new_store(path, owner) -> Store:
    fingerprint = {"model": {"id": "m"}, "tokenizer": {}, "corpus": {"spec": "s", "groups": ["a", "b"]},
                   "settings": {"stats": ["active"]}}
    return Store.create(path, StoreAttrs.new(fingerprint, layers=2, width=4, specs=["s"]), n_shards=4, owner=owner)


def test_a_refused_run_removes_only_its_own_store_without_finished_shards(tmp_path, capsys):
    from harvester.driver import _remove_created

    for finished in (False, True):
        path = tmp_path / f"st-{finished}"
        with lease.acquire(str(path)) as held:
            store = _new_store(path, held.info)
            if finished:
                store.write_shard(1, {0: {"tokens": 3, "active": np.ones((2, 4))}})
            _remove_created(str(path), held)
        assert path.exists() == finished
    path = tmp_path / "taken"
    with lease.acquire(str(path)) as held:
        _new_store(path, held.info)
        lease.create_exclusive(f"{held.dir}/{held.gen + 1:08d}.json", json.dumps(lease.owner_record()).encode())
        _remove_created(str(path), held)  # another run took the lease: its store is not ours to remove
        assert path.exists()
    assert "removed store" in capsys.readouterr().err


# -- item 4: no silent loss -----------------------------------------------------------------------------------
def reference_cut(jsonl, seq_len):
    """Per group ``{name: [kept, cut tokens, cut documents]}`` with plain loops over the examples."""
    tok = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    out = {}
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        ex = json.loads(line)
        ids = []
        for role in ("prompt", "response"):
            ids += [f"{ex['lang']}:{role}"] * len(tok(ex[role], add_special_tokens=False)["input_ids"])
        ids.append(ids[-1])  # EOS counts for the last segment's group
        for name in dict.fromkeys(ids):
            kept, cut = ids[:seq_len].count(name), ids[seq_len:].count(name)
            row = out.setdefault(name, [0, 0, 0])
            row[0] += kept
            row[1] += cut
            row[2] += cut > 0
    return out


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    return fixtures.write_instruct(tmp_path_factory.mktemp("data") / "inst.jsonl", langs=("en", "de"), n=4)


def test_truncation_is_reported_per_group_and_an_empty_group_is_an_error(tmp_path, capsys, instruct):
    store, seq_len = tmp_path / "st", 12
    expected = reference_cut(instruct, seq_len)
    assert all(v[0] == 0 for k, v in expected.items() if k.endswith(":response"))  # the case of the issue
    code, out, err = run(capsys, "harvest", *FAST, *OLD, "--corpus", f"instruct:{instruct}", "--seq-len", seq_len,
                         "--store", store)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1] == ("lsn: error: 2 group(s) ended with no tokens: "
                         f"en:response (all {expected['en:response'][1]} cut off at --seq-len 12), "
                         f"de:response (all {expected['de:response'][1]} cut off at --seq-len 12); the store is "
                         "complete for the other groups; harvest again with a larger --seq-len and --overwrite "
                         "(or a new --store)")
    for name in ("en:prompt", "de:prompt"):
        kept, cut, docs = expected[name]
        assert (f"lsn: warning: group {name} lost {cut} of its {kept + cut} tokens ({100 * cut / (kept + cut):.1f}%) "
                f"in {docs} documents longer than --seq-len 12; a larger --seq-len keeps them") in lines
    corpus = read_attrs(store).corpus
    assert read_attrs(store).complete
    assert corpus.truncated_tokens_per_group == tuple(expected[g][1] for g in corpus.groups)
    assert corpus.truncated_documents_per_group == tuple(expected[g][2] for g in corpus.groups)
    assert sum(corpus.truncated_tokens_per_group) == corpus.truncated_tokens
    code, summary, err = run(capsys, "summary", "--store", store)
    assert code == 0 and "ended with no tokens" in err
    assert "cut tok" in out and summary == out  # the harvest prints the same table
    row = next(line for line in summary.splitlines() if line.startswith("en:response")).split()
    assert row[1] == "0" and row[-2:] == [str(expected["en:response"][1]), str(expected["en:response"][2])]


def test_a_small_loss_warns_and_none_stays_quiet(tmp_path, capsys, instruct):
    longest = max(sum(v[:2]) for v in reference_cut(instruct, 10_000).values())
    seq_len = next(n for n in range(8, 512) if all(v[0] > 0 for v in reference_cut(instruct, n).values()))
    expected = reference_cut(instruct, seq_len)
    code, _, err = run(capsys, "harvest", *FAST, *OLD, "--corpus", f"instruct:{instruct}", "--seq-len", seq_len,
                       "--store", tmp_path / "a")
    assert code == 0, err
    warned = {line.split()[3] for line in err.splitlines() if line.startswith("lsn: warning: group ")}
    assert warned == {g for g, (kept, cut, _) in expected.items() if cut > 0.01 * (kept + cut)} != set()
    code, _, err = run(capsys, "harvest", *FAST, *OLD, "--corpus", f"instruct:{instruct}", "--seq-len", 2 * longest,
                       "--store", tmp_path / "b")
    assert code == 0 and "warning" not in err
    assert read_attrs(tmp_path / "b").corpus.truncated_tokens_per_group == (0, 0, 0, 0)


def test_analysis_and_interventions_flag_empty_groups_and_masks(tmp_path, capsys, instruct):
    store = tmp_path / "st"
    assert run(capsys, "harvest", *FAST, "--corpus", f"instruct:{instruct}", "--seq-len", 12, "--store", store)[0] == 2
    code, _, err = run(capsys, "analyze", "lape", "--store", store, "--out", tmp_path / "m.npz")
    assert code == 0
    for lang in ("en", "de"):  # the response groups, the languages by default
        assert f"lsn: warning: language {lang} has no tokens in {store} (groups {lang}:response)" in err
    code, out, err = run(capsys, "analyze", "lape", "--store", store, "--langs", "en:prompt,de:prompt",
                         "--top-rate", 0, "--out", tmp_path / "empty.npz")
    assert code == 0 and "has no tokens" not in err
    assert "lsn: warning: the mask selects no unit for en:prompt, de:prompt; interventions on them change nothing" in err
    corpus = tmp_path / "eval"
    corpus.mkdir()
    for lang, texts in fixtures.sentences(("en", "de"), 3).items():
        (corpus / f"{lang}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "intervene", "ppl", "--model", MODEL, "--mask", tmp_path / "empty.npz",
                         "--corpus", f"text:{corpus}", "--seq-len", 32, "--out", tmp_path / "ppl", "--no-ray",
                         "--no-progress")
    assert code == 0, err
    marked = [line.split()[0] for line in out.splitlines() if line.split()[1:3] == ["(empty", "mask)"]]
    empty = ["en:prompt", "de:prompt", "random:en:prompt", "random:de:prompt"]  # controls of an empty mask too
    assert marked == empty
    assert "lsn: warning: row en:prompt intervenes on no unit (its mask is empty); it repeats the row none" in err
    settings = json.loads((tmp_path / "ppl" / "ppl.json").read_text())["settings"]
    assert settings["empty_mask"] == empty


def test_per_group_truncation_is_checked_and_older_stores_still_read(tmp_path, capsys, instruct):
    store = tmp_path / "st"
    assert run(capsys, "harvest", *FAST, "--corpus", f"instruct:{instruct}", "--seq-len", 256, "--store", store)[0] == 0
    raw = read_attrs(store).to_dict()
    older = json.loads(json.dumps(raw))
    for key in ("truncated_tokens_per_group", "truncated_documents_per_group"):
        del older["meta"]["corpus"][key]
    assert StoreAttrs.from_dict(older, store).corpus.truncated_tokens_per_group is None
    raw["meta"]["corpus"]["truncated_tokens_per_group"] = [0, 0]
    with pytest.raises(HarvestError, match=r"meta.corpus.truncated_tokens_per_group: has 2 entries for 4 groups"):
        StoreAttrs.from_dict(raw, store)
    raw["meta"]["corpus"]["truncated_tokens_per_group"] = [0, 0, -1, 0]
    with pytest.raises(HarvestError, match=r"truncated_tokens_per_group\[2\]: is negative"):
        StoreAttrs.from_dict(raw, store)


def test_an_ec40_target_side_cut_short_is_a_warning(tmp_path, capsys):
    data = fixtures.write_ec40(tmp_path / "ec40", langs=("fr",), n=6)
    store = tmp_path / "st"
    code, out, err = run(capsys, "harvest", *FAST, "--corpus", f"ec40:{data}", "--pairs", "en-fr,fr-en",
                         "--seq-len", 24, "--store", store)
    assert code == 0, err
    corpus = read_attrs(store).corpus
    kept, cut = corpus.tokens_per_group, corpus.truncated_tokens_per_group
    lossy = {g for g, k, c in zip(corpus.groups, kept, cut) if c > 0.01 * (k + c)}
    assert "en-fr:tgt" in lossy and sum(cut) == corpus.truncated_tokens > 0
    warned = {line.split()[3] for line in err.splitlines() if line.startswith("lsn: warning: group ")}
    assert warned == lossy
    row = next(line for line in out.splitlines() if line.startswith("en-fr:tgt")).split()
    assert row[-2:] == [str(cut[corpus.groups.index("en-fr:tgt")]),
                        str(corpus.truncated_documents_per_group[corpus.groups.index("en-fr:tgt")])]


def test_generate_marks_rows_of_an_empty_mask(tmp_path, capsys, instruct):
    store = tmp_path / "st"
    assert run(capsys, "harvest", *FAST, "--corpus", f"instruct:{instruct}", "--seq-len", 64, "--store", store)[0] == 0
    assert run(capsys, "analyze", "lape", "--store", store, "--langs", "en:prompt,de:prompt", "--out",
               tmp_path / "m.npz")[0] == 0
    assert run(capsys, "analyze", "lape", "--store", store, "--langs", "en:prompt,de:prompt", "--top-rate", 0,
               "--out", tmp_path / "empty.npz")[0] == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"lang": "en", "prompt": "the people who"}) + "\n")
    for mask, empty in (("m.npz", []), ("empty.npz", ["en:prompt", "de:prompt"])):
        out = tmp_path / f"gen-{mask}"
        code, _, err = run(capsys, "intervene", "generate", "--model", MODEL, "--mask", tmp_path / mask, "--prompts",
                           prompts, "--out", out, "--max-new-tokens", 3, "--controls", 0, "--no-ray", "--no-progress")
        assert code == 0, err
        units = pd.read_csv(out / "generate.csv").set_index("intervened")["units"]
        assert units["none"] == 0
        assert [lang for lang in ("en:prompt", "de:prompt") if units[lang] == 0] == empty
        assert json.loads((out / "generate.json").read_text())["settings"]["empty_mask"] == empty
        assert ("intervenes on no unit" in err) == bool(empty)


def test_truncate_is_named_and_pooled_samples_are_not_read_as_tokens(tmp_path, capsys):
    """A pooled store's ``tokens`` counts stimuli: its cuts are reported per sample and blamed on --truncate
    (pooled documents longer than --seq-len are refused before the harvest), not as a share of tokens."""
    from harvester.corpus.sample import write_stimuli
    from harvester.store import read_attrs
    from harvester.summary import losses

    stimuli = write_stimuli(tmp_path / "stim.csv", "en", 8)
    assert main(["harvest", "--model", "tiny:llama", "--corpus", f"stimuli:{stimuli}", "--pooling", "last",
                 "--truncate", "4", "--store", str(tmp_path / "s"), "--seq-len", "128", "--no-ray",
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "no EOS (pooled samples)" in out  # a pooled sample never had one, whatever the settings say
    attrs = read_attrs(tmp_path / "s")
    warnings, empty = losses(attrs)
    assert not empty and len(warnings) == 2
    for line, group in zip(warnings, attrs.corpus.groups):
        g = attrs.corpus.groups.index(group)
        cut, docs = attrs.corpus.truncated_tokens_per_group[g], attrs.corpus.truncated_documents_per_group[g]
        assert line == (f"group {group}: {cut} tokens cut from {docs} of its {attrs.totals.tokens[g]} samples "
                        "longer than --truncate 4") and cut > 0
        assert f"lsn: warning: {line}" in err
    assert "--seq-len" not in err
