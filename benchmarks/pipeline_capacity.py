"""Pipeline capacity: the tokens/s that everything around the model sustains.

On a GPU the model is about 100x faster than on these CPUs, so what surrounds it sets the pace:
reading the corpus, tokenization, token shards, dispatch to the actors, store writes and the
reduction. This runs the whole ``lsn harvest`` path (``harvester.driver.harvest``) with the model and
its statistics replaced by the test-only null backend (``tests/null_backend.py``): it reads only the
model's config and returns statistics of the model's shape (Llama-3.1-8B: 32 layers x 14,336
neurons, unless ``--layers/--width``) at no cost, so every other stage does its real work.

1. Stages alone, one process: corpus reading + tokenization into Parquet token shards, reading a
   shard back (with its digest check), one shard's statistics written into a real Zarr store at
   the model's shape, and the reduction, each as tokens/s.
2. The whole harvest, in this process (``--no-ray``) and on an embedded local Ray instance with 1
   and 2 actors, each into a fresh store. Where the time goes comes from the store itself: start-up
   (up to the first shard's ``done`` marker: Ray, actors, config, the first shard's tokens), the
   stream of shards (first to last ``done`` marker: the sustained rate), and the reduction after it.

The corpus is ``text:DIR``, one file per language written from the built-in sample corpus (real
words of 12 languages in 8 scripts). The tokenizer (``--tokenizer``) is by default Llama-3's kind,
made here without a download: its pre-tokenizer (the same split pattern, then byte-level) and a
byte-level BPE of ``--vocab`` (32,000) merges trained in memory on the corpus itself, which gives
about as many characters per token as a real model's tokenizer does on real text. ``tiny`` is the
tiny:llama tokenizer (1,024 entries: about three times as many tokens for the same text, each
cheaper). Figures are given in tokens/s and in characters/s.

The last line is ``pipeline tokens/s (sustained, best of 1 and 2 actors): X``; the goal is >= 250,000
on 2 cores, enough to feed 8 GPUs at 30,000 tokens/s each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harvest_overhead import PRESETS  # noqa: E402

from harvester.backends.hf import load_tokenizer, quiet_transformers, resolve_model  # noqa: E402
from harvester.config import HarvestConfig  # noqa: E402
from harvester.corpus import parse_corpora  # noqa: E402
from harvester.corpus.sample import SampleCorpus  # noqa: E402
from harvester.driver import harvest  # noqa: E402
from harvester.stats import StatsSpec  # noqa: E402
from harvester.store import Store, StoreAttrs  # noqa: E402
from harvester.windows import TokenSettings, load_shard, tokenize_stream  # noqa: E402

NULL_BACKEND = "tests.null_backend:NullBackend"


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama-3's pre-tokenizer split pattern (its tokenizer.json), applied before the byte-level step."""


def llama3_like(texts: list[str], vocab: int):
    """A tokenizer of Llama-3's kind: its split pattern, byte-level BPE with ``vocab`` entries trained
    on ``texts``, and its special tokens' roles (BOS, EOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")


def write_corpus(root: Path, args: argparse.Namespace) -> tuple[str, dict[str, list[str]]]:
    """The benchmark's corpus: ``text:DIR`` (one file per language, packed windows) or
    ``instruct:FILE`` (each document split into a prompt and a response: one short window an example,
    as EC40 and instruction data are harvested). Returns its spec and each language's texts."""
    langs = args.langs.split(",")
    sample = SampleCorpus.from_spec("sample", f"docs={args.docs},sentences=8,langs={'+'.join(langs)}")
    texts = {lang: list(sample.texts(lang)) for lang in langs}
    root.mkdir()
    if args.corpus == "text":
        for lang, docs in texts.items():
            (root / f"{lang}.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
        return f"text:{root}", texts
    with open(root / "instruct.jsonl", "w", encoding="utf-8") as f:
        for lang, docs in texts.items():
            for doc in docs:
                cut = len(doc) // 3
                f.write(json.dumps({"lang": lang, "prompt": doc[:cut], "response": doc[cut:]}) + "\n")
    return f"instruct:{root / 'instruct.jsonl'}", texts


def write_inputs(root: Path, args: argparse.Namespace) -> tuple[str, str, int]:
    """A config-only model directory with its tokenizer, the corpus, and the first stream's characters."""
    from transformers import AutoConfig

    corpus, texts = write_corpus(root / "corpus", args)
    all_texts = [t for docs in texts.values() for t in docs]
    tokenizer = load_tokenizer(resolve_model("tiny:llama")) if args.tokenizer == "tiny" else \
        llama3_like(all_texts, args.vocab)
    shape = PRESETS["llama3-8b"]
    model = root / "model"
    AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=shape["hidden"],
                         intermediate_size=args.width, num_hidden_layers=args.layers,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=8192, eos_token_id=tokenizer.eos_token_id).save_pretrained(model)
    tokenizer.save_pretrained(model)
    return str(model), corpus, sum(len(t) for t in next(iter(texts.values())))


def stages(model: str, corpus: str, chars: int, seq_len: int, shard_tokens: int, root: Path) -> dict[str, float]:
    """Each stage alone in this process, as tokens/s."""
    tokenizer = load_tokenizer(model)
    corpora = parse_corpora(corpus)
    settings = TokenSettings(seq_len, shard_tokens, "token", "bench", tokenizer.eos_token_id)
    start, cpu = time.perf_counter(), time.process_time()
    infos = list(tokenize_stream(corpora, 0, tokenizer, settings, str(root / "tokens")))
    tokenize, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = sum(i.n_tokens for i in infos)
    start = time.perf_counter()
    shards = [load_shard(i) for i in infos]
    load = time.perf_counter() - start

    from tests.null_backend import NullBackend

    backend, spec = NullBackend(model), StatsSpec()
    results = [backend.statistics(s.windows, spec, 8) for s in shards]
    fingerprint = {"model": {}, "tokenizer": {}, "corpus": {"spec": corpus, "groups": corpora.groups},
                   "settings": {"stats": list(spec.stats)}}
    attrs = StoreAttrs.new(fingerprint, layers=backend.n_layers, width=backend.width, specs=[corpus])
    store = Store.create(root / "store", attrs, n_shards=len(infos))
    start = time.perf_counter()
    for k, result in enumerate(results):
        store.write_shard(k, result)
    write = time.perf_counter() - start
    start = time.perf_counter()
    store.reduce(list(range(len(infos))))
    reduce = time.perf_counter() - start
    print(f"  one stream: {n:,} tokens ({chars / n:.2f} characters a token) in {len(infos)} shard(s) of "
          f"<= {shard_tokens:,} tokens; tokenization {chars / tokenize:,.0f} characters/s, "
          f"{n / cpu:,.0f} tokens per CPU-second")
    return {"tokenize": n / tokenize, "load shard": n / load, "write shard": n / write, "reduce": n / reduce}


def phases(store: str, started: float, ended: float) -> dict[str, float]:
    """Start-up, streaming and reduction seconds of a finished harvest, from its ``done`` markers'
    modification times (each marker is one chunk file, written once its shard's rows are in); the
    sustained rate counts the tokens of every shard but the first to finish."""
    tokens = {}
    for manifest in Path(store, "tokens").glob("[0-9]*.json"):  # beside the tokens array's zarr.json
        for info in json.loads(manifest.read_text())["shards"]:
            tokens[info["index"]] = info["n_tokens"]
    done = sorted((p.stat().st_mtime, int(p.name)) for p in Path(store, "shards", "done", "c").iterdir())
    stream = done[-1][0] - done[0][0]
    total = sum(tokens.values())
    return {"startup": done[0][0] - started, "stream": stream, "reduce": ended - done[-1][0],
            "sustained": (total - tokens[done[0][1]]) / stream if stream > 0 else float("nan"),
            "tokens": total, "shards": len(done), "wall": ended - started}


def whole(model: str, corpus: str, seq_len: int, shard_tokens: int, root: Path, actors: int | None) -> dict:
    """One whole harvest into a fresh store: ``actors`` None runs in this process (``--no-ray``)."""
    store = str(root / f"store-{actors}-{time.monotonic_ns()}")
    cfg = HarvestConfig(model=model, corpus=corpus, store=store, backend=NULL_BACKEND, seq_len=seq_len,
                        batch_size=8, shard_tokens=shard_tokens, actors=actors, use_ray=actors is not None,
                        progress=False)
    started = time.time()
    harvest(cfg)
    return phases(store, started, time.time())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=PRESETS["llama3-8b"]["layers"])
    ap.add_argument("--width", type=int, default=PRESETS["llama3-8b"]["width"])
    ap.add_argument("--langs", default="en,de,ru,zh", help="sample-corpus languages, one stream each")
    ap.add_argument("--docs", type=int, default=40_000, help="documents (8 sentences each) per language")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--shard-tokens", type=int, default=1 << 20)
    ap.add_argument("--corpus", choices=["text", "instruct"], default="text",
                    help="text: packed windows; instruct: one short window an example (as EC40)")
    ap.add_argument("--tokenizer", choices=["llama3-like", "tiny"], default="llama3-like")
    ap.add_argument("--vocab", type=int, default=32_000, help="BPE entries of the llama3-like tokenizer")
    ap.add_argument("--repeats", type=int, default=1, help="whole-harvest runs per setting (median)")
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        model, corpus, chars = write_inputs(Path(tmp), args)
        print(f"1. stages alone (one process), statistics of {args.layers} x {args.width} neurons, "
              f"seq-len {args.seq_len}")
        for name, rate in stages(model, corpus, chars, args.seq_len, args.shard_tokens, Path(tmp, "stages")).items():
            print(f"  {name:>12}: {rate:12,.0f} tokens/s")
        print(f"2. whole harvest, null backend, {os.cpu_count()} CPUs: start-up / stream of shards / reduction")
        sustained = {}
        for actors in (None, 1, 2):
            runs = [whole(model, corpus, args.seq_len, args.shard_tokens, Path(tmp), actors)
                    for _ in range(args.repeats)]
            run = sorted(runs, key=lambda r: r["sustained"])[len(runs) // 2]
            sustained[actors] = statistics.median(r["sustained"] for r in runs)
            name = "no Ray" if actors is None else f"{actors} actor(s)"
            print(f"  {name:>10}: {run['tokens']:,} tokens, {run['shards']} shards in {run['wall']:.1f} s "
                  f"({run['tokens'] / run['wall']:,.0f} tokens/s whole command): start-up {run['startup']:.1f} s, "
                  f"shards {run['stream']:.1f} s ({run['sustained']:,.0f} tokens/s sustained), "
                  f"reduction (and Ray's shut-down) {run['reduce']:.1f} s")
    best = max((r for r in (sustained[1], sustained[2]) if r == r), default=float("nan"))  # NaN: one shard only
    print(f"pipeline tokens/s (sustained, best of 1 and 2 actors): {best:,.0f}")


if __name__ == "__main__":
    main()
