"""``--template chat|FORMAT`` for instruct and EC40 corpora, and EC40's ``--sides``, against plain string building."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import xarray as xr

from harvester.config import AYA, HarvestOptions
from harvester.corpus import CorpusOptions, parse_corpus
from harvester.errors import HarvestError
from harvester.store import read_attrs
from lsn.cli import main
from tests import fixtures

CHAT = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
"""A chat template in the usual shape: a header per turn, the content, a closing tag."""

BOS_BRANCH = "bos" in {f.name for f in dataclasses.fields(HarvestOptions)}


def chat_prompt(prompt: str) -> str:
    return f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n"


def chat_response(response: str) -> str:
    return f"{response}<|end|>\n"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """tiny:llama whose tokenizer has :data:`CHAT` as its chat template."""
    from transformers import AutoTokenizer

    from harvester.tiny import tiny_path

    path = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_path("tiny:llama"), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model)


def examples(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_chat_template_splits_at_the_assistant_header(tmp_path, tokenizer):
    data = fixtures.write_instruct(tmp_path / "i.jsonl", langs=("en", "de"), n=3)
    corpus = parse_corpus(f"instruct:{data}", CorpusOptions(template="chat"), tokenizer)
    want = [[("de:prompt", chat_prompt(r["prompt"])), ("de:response", chat_response(r["response"]))]
            for r in examples(data) if r["lang"] == "de"]
    assert list(corpus.documents("de")) == want
    assert "".join(text for _, text in want[0]) == tokenizer.apply_chat_template(
        [{"role": "user", "content": examples(data)[1]["prompt"]},
         {"role": "assistant", "content": examples(data)[1]["response"]}], tokenize=False)
    assert len(corpus.source()["chat_template_sha256"]) == 64


def test_format_template_for_instruct_rewrites_the_prompt_only(tmp_path):
    data = fixtures.write_instruct(tmp_path / "i.jsonl", langs=("en",), n=2)
    corpus = parse_corpus(f"instruct:{data}", CorpusOptions(template="Question: {prompt}\n{{answer}}: "))
    assert list(corpus.documents("en")) == [[("en:prompt", f"Question: {r['prompt']}\n{{answer}}: "),
                                             ("en:response", r["response"])] for r in examples(data)]


def ec40_lines(root, lang: str, side: str, n: int) -> list[str]:
    name = f"en-{lang}.{side}"
    return (root / "EC40-train-set" / name).read_text(encoding="utf-8").splitlines()[:n]


@pytest.mark.parametrize("sides", ["src", "tgt", "both"])
def test_ec40_sides(tmp_path, sides):
    root = fixtures.write_ec40(tmp_path / "ec40", langs=("fr",), n=4)
    corpus = parse_corpus(f"ec40:{root}", CorpusOptions(pairs="en-fr,fr-en", max_pairs=3, sides=sides))
    keep = ("src", "tgt") if sides == "both" else (sides,)
    assert corpus.groups == [f"{d}:{s}" for d in ("en-fr", "fr-en") for s in keep]
    en, fr = ec40_lines(root, "fr", "en", 3), ec40_lines(root, "fr", "fr", 3)
    assert list(corpus.documents("fr-en")) == [[(f"fr-en:{s}", {"src": a, "tgt": b}[s]) for s in keep]
                                               for a, b in zip(fr, en)]


def test_ec40_format_template_is_the_aya_prompt(tmp_path):
    root = fixtures.write_ec40(tmp_path / "ec40", langs=("fr",), n=4)
    options = CorpusOptions(pairs="en-fr,fr-en", max_pairs=2, template="Translate from {src_lang} to {tgt_lang}: {src}")
    corpus = parse_corpus(f"ec40:{root}", options)
    en, fr = ec40_lines(root, "fr", "en", 2), ec40_lines(root, "fr", "fr", 2)
    assert list(corpus.documents("fr-en")) == [[("fr-en:src", f"Translate from fr to en: {a}"), ("fr-en:tgt", b)]
                                               for a, b in zip(fr, en)]
    assert list(corpus.documents("en-fr"))[0][0] == ("en-fr:src", f"Translate from en to fr: {en[0]}")


def test_aya_values_are_harvest_options(tmp_path):
    """``config.AYA`` is one dict of HarvestOptions values (what ``--preset aya`` will apply)."""
    root = fixtures.write_ec40(tmp_path / "ec40", langs=("fr",), n=4, split="validation")
    options = HarvestOptions(model="tiny:llama", corpus=[f"ec40:{root}"], store=str(tmp_path / "s"), **AYA)
    cfg = options.config()
    assert (cfg.corpus_options.sides, cfg.corpus_options.split) == ("src", "validation")
    corpus = parse_corpus(cfg.corpus[0], dataclasses.replace(cfg.corpus_options, pairs="fr-en"))
    assert corpus.groups == ["fr-en:src"]
    first = (root / "Ntrex-eval-set" / "test.en-fr.fr").read_text(encoding="utf-8").splitlines()[0]
    assert next(iter(corpus.documents("fr-en"))) == [("fr-en:src", f"Translate from fr to en: {first}")]


@pytest.mark.parametrize("kind, template, options, expected", [
    ("instruct", "Q: {question}", {}, "unknown placeholder {question} for instruct corpora; known: {prompt}"),
    ("instruct", "Q: {prompt.upper}", {}, "unknown placeholder {prompt.upper}"),
    ("instruct", "Answer this.", {}, "has no {prompt}"),
    ("instruct", "Q: {prompt", {}, "is not a format string"),
    ("ec40", "{src} to {tgt}", {}, "unknown placeholder {tgt} for EC40 corpora; known: {src_lang}, {tgt_lang}, {src}"),
    ("ec40", "Translate to {tgt_lang}", {}, "has no {src}"),
    ("ec40", "chat", {}, "--template chat is for instruct corpora"),
    ("ec40", "Translate: {src}", {"sides": "tgt"}, "which --sides tgt leaves out"),
    ("instruct", "chat", {}, "this model's tokenizer has no chat template"),
    ("ec40", "{src!x}", {}, "a placeholder takes no conversion or format spec ({src!x}); write it as {src}"),
    ("instruct", "{prompt:d}", {}, "takes no conversion or format spec ({prompt:d})"),
    ("instruct", "Q: {prompt:>99999999999}", {}, "takes no conversion or format spec"),  # was a MemoryError
    ("instruct", "{}", {}, "unknown placeholder {}"),
])
def test_template_errors(tmp_path, kind, template, options, expected):
    from harvester.tiny import train_tokenizer

    if kind == "instruct":
        spec = f"instruct:{fixtures.write_instruct(tmp_path / 'i.jsonl', n=1)}"
    else:
        spec = f"ec40:{fixtures.write_ec40(tmp_path / 'ec40', langs=('fr',), n=2)}"
    with pytest.raises(HarvestError) as err:
        parse_corpus(spec, CorpusOptions(template=template, **options), train_tokenizer())
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_chat_template_without_a_prompt_boundary_is_refused(tmp_path):
    from harvester.tiny import train_tokenizer

    tok = train_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<gen>{% endif %}")
    with pytest.raises(HarvestError, match="no prompt/response boundary"):
        parse_corpus(f"instruct:{fixtures.write_instruct(tmp_path / 'i.jsonl', n=1)}",
                     CorpusOptions(template="chat"), tok)


@pytest.mark.parametrize("flags, expected", [
    (["--corpus", "sample:docs=2", "--template", "{prompt}"], "--template is for instruct and ec40 corpora"),
    (["--corpus", "sample:docs=2", "--sides", "src"], "--sides is for ec40 corpora"),
    (["--corpus", "sample:docs=2", "--truncate", "5"], "--truncate cuts the examples of instruct, lna, ec40"),
    (["--corpus", "sample:docs=2", "--truncation-side", "left"], "--truncation-side needs --truncate N"),
])
def test_options_no_corpus_uses_are_refused(tmp_path, capsys, flags, expected):
    assert main(["harvest", "--model", "tiny:llama", "--store", str(tmp_path / "s"), "--no-ray", *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and not (tmp_path / "s").exists()


def test_chat_harvest_counts_the_rendered_parts(tmp_path, chat_model, tokenizer):
    """Through the CLI: the prompt group counts the prompt's rendering up to the assistant header, the
    response group the rest; the template goes into the store's fingerprint."""
    data = fixtures.write_instruct(tmp_path / "i.jsonl", langs=("en", "zh"), n=3)
    store = tmp_path / "store"
    assert main(["harvest", "--model", str(chat_model), "--corpus", f"instruct:{data}", "--template", "chat",
                 "--store", str(store), "--seq-len", "256", "--no-ray", "--no-progress"]) == 0
    ds = xr.open_zarr(store)

    def n(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    own_bos = len(tokenizer.encode("x")) - n("x")  # the BOS --bos auto adds: none for this tokenizer
    for lang in ("en", "zh"):
        rows = [r for r in examples(data) if r["lang"] == lang]
        prompt = sum(n(chat_prompt(r["prompt"])) + (own_bos if BOS_BRANCH else 0) for r in rows)
        response = sum(n(chat_response(r["response"])) + (0 if BOS_BRANCH else 1) for r in rows)  # + EOS before --bos
        assert int(ds["tokens"].sel(group=f"{lang}:prompt")) == prompt
        assert int(ds["tokens"].sel(group=f"{lang}:response")) == response
    corpus = read_attrs(store)["fingerprint"]["corpus"]
    assert corpus["options"]["template"] == "chat" and corpus["source"][0]["chat_template_sha256"]


def test_the_format_template_is_in_the_fingerprint(tmp_path):
    root = fixtures.write_ec40(tmp_path / "ec40", langs=("fr",), n=3)
    template = "Translate from {src_lang} to {tgt_lang}: {src}"
    store = tmp_path / "store"
    assert main(["harvest", "--model", "tiny:llama", "--corpus", f"ec40:{root}", "--pairs", "fr-en", "--sides", "src",
                 "--template", template, "--store", str(store), "--seq-len", "128", "--no-ray", "--no-progress"]) == 0
    attrs = read_attrs(store)
    assert attrs["fingerprint"]["corpus"]["options"]["template"] == template
    assert attrs["fingerprint"]["corpus"]["options"]["sides"] == "src"
    assert [str(g) for g in xr.open_zarr(store)["group"].values] == ["fr-en:src"]


def test_a_bad_template_with_overwrite_keeps_the_finished_store(tmp_path, capsys):
    """Was a ValueError traceback at tokenization, after --overwrite had removed the finished store."""
    spec = f"ec40:{fixtures.write_ec40(tmp_path / 'ec40', langs=('fr',), n=3)}"
    args = ["harvest", "--model", "tiny:llama", "--corpus", spec, "--pairs", "fr-en",
            "--store", str(tmp_path / "s"), "--no-ray", "--no-progress"]
    assert main(args) == 0
    before = read_attrs(tmp_path / "s")
    capsys.readouterr()
    assert main([*args, "--template", "{src!x}", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes no conversion" in err
    assert read_attrs(tmp_path / "s") == before and before.complete


def test_a_chat_template_that_fails_on_a_later_example_fails_first(tmp_path):
    from harvester.tiny import train_tokenizer

    tok = train_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if 'boom' in m.content %}{{ raise_exception('no boom') }}"
                         "{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = tmp_path / "i.jsonl"
    path.write_text("\n".join(json.dumps({"lang": "en", "prompt": p, "response": "ok"})
                              for p in ("fine", "also fine", "a boom here")) + "\n", encoding="utf-8")
    with pytest.raises(HarvestError, match=r"i.jsonl: example 3: --template chat: the chat template failed"):
        parse_corpus(f"instruct:{path}", CorpusOptions(template="chat"), tok)
