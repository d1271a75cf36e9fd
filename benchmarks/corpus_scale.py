"""Scale figures: tokenization throughput, harvest throughput with 1 and 2 Ray actors, planning figures.

1. Tokenization: one stream of the sample corpus tokenized into Parquet token shards by the same code
   the Ray tasks run (one process, one core), tokens/s.
2. Harvest: the same corpus harvested by the embedded Ray cluster with 1 actor and with 2 actors
   (alternating, fresh store each time), on a random Llama (8 layers, hidden 512, MLP width 1376);
   tokens/s over the whole command (Ray start, model loading and the store included).
3. Planning figures for the full EC40 harvest (80 directions) and a 10-language Wikipedia harvest on
   N GPUs: shards, store size (exact, from the store layout) and hours, from a per-GPU throughput
   (``--gpu-tokens-per-s``: measure it with ``benchmarks/gpu_check.sh`` on the GPU) and the rate
   everything around the model sustains on 2 cores (``--pipeline-tokens-per-s``, measured by
   ``benchmarks/pipeline_capacity.py``); the harvest runs at the lower of the two.

The last line is ``2-actor/1-actor throughput ratio: X``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harvest_overhead import build_model  # noqa: E402

from harvester.backends.hf import load_tokenizer, quiet_transformers, resolve_model  # noqa: E402
from harvester.config import HarvestConfig  # noqa: E402
from harvester.corpus import parse_corpora  # noqa: E402
from harvester.driver import harvest  # noqa: E402
from harvester.windows import TokenSettings, tokenize_stream  # noqa: E402


PIPELINE_TOKENS_PER_S = 650_000.0
"""``pipeline_capacity.py``'s sustained rate on the project's 2-core machine, the lower of its text
(692k) and instruction-data (668k) runs, rounded down; 2026-12-01, benchmarks/RESULTS.md."""


def tokenization_rate(docs: int) -> float:
    tok = load_tokenizer(resolve_model("tiny:llama"))
    corpora = parse_corpora(f"sample:docs={docs},langs=en+zh+ru")
    settings = TokenSettings(512, 1 << 20, "token", "bench", tok.eos_token_id)
    rates = []
    for stream in range(len(corpora.streams)):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            n = sum(info.n_tokens for info in tokenize_stream(corpora, stream, tok, settings, tmp))
            rates.append(n / (time.perf_counter() - start))
            print(f"  tokenize {corpora.streams[stream].name}: {n} tokens, {rates[-1]:,.0f} tok/s")
    return statistics.median(rates)


def harvest_rate(model: str, corpus: str, actors: int, root: str) -> tuple[float, float, int]:
    store = f"{root}/store-{actors}-{time.monotonic_ns()}"
    cfg = HarvestConfig(model=model, corpus=corpus, store=store, seq_len=256, batch_size=4, shard_tokens=8192,
                        actors=actors, progress=False)
    start = time.perf_counter()
    result = harvest(cfg)
    wall = time.perf_counter() - start
    tokens = sum(result.attrs.corpus.tokens_per_group)
    return tokens / wall, wall, tokens


def plan(name: str, tokens: float, groups: int, streams: int, layers: int, width: int, shard_tokens: int,
         gpus: int, gpu_rate: float, pipeline_rate: float) -> str:
    shards = max(streams, int(tokens / shard_tokens) + streams)  # each stream ends in a partial shard
    per_group = layers * width * 24  # active int64 + act_sum, act_sqsum float64
    totals = groups * per_group
    rows = shards * per_group * max(1, groups // streams)  # each shard holds the groups of its stream
    hours = tokens / min(gpus * gpu_rate, pipeline_rate) / 3600
    pipeline_hours = tokens / pipeline_rate / 3600
    return (f"| {name} | {tokens / 1e6:,.0f}M | {groups} | {shards:,} | {totals / 2**30:.1f} GiB | "
            f"{rows / 2**30:.1f} GiB | {gpus} | {hours:.1f} h | {pipeline_hours:.2f} h |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=60, help="sample documents per language in the harvest runs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-tokens-per-s", type=float, default=20_000.0,
                    help="harvest tokens/s per GPU for the planned model (an assumption until measured)")
    ap.add_argument("--pipeline-tokens-per-s", type=float, default=PIPELINE_TOKENS_PER_S,
                    help="what the pipeline around the model sustains (benchmarks/pipeline_capacity.py)")
    args = ap.parse_args()
    quiet_transformers()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    print("1. tokenization (one core, tiny BPE tokenizer, Parquet shards)")
    tok_rate = tokenization_rate(3000)
    print(f"tokenization tokens/s: {tok_rate:,.0f}")

    print(f"2. harvest, embedded Ray, random Llama 8x512/1376, sample corpus docs={args.docs}, "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        build_model(f"{tmp}/model", 8, 512, 1376)
        load_tokenizer(resolve_model("tiny:llama")).save_pretrained(f"{tmp}/model")  # ids < the model's vocab
        corpus = f"sample:docs={args.docs},langs=en+de+ru+zh"
        rates = {1: [], 2: []}
        for _ in range(args.repeats):
            for actors in (1, 2):
                rate, wall, tokens = harvest_rate(f"{tmp}/model", corpus, actors, tmp)
                rates[actors].append(rate)
                print(f"  {actors} actor(s): {tokens} tokens in {wall:.1f} s = {rate:,.0f} tok/s (whole command)")
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"harvest tokens/s: 1 actor {one:,.0f}, 2 actors {two:,.0f}")

    print(f"3. planning figures: Llama-3.1-8B (32 layers x 14336), {args.gpu_tokens_per_s:,.0f} tok/s per GPU "
          "(assumed), 1M-token shards, stats active,sum,sqsum (uncompressed sizes)")
    print(f"   pipeline around the model: {args.pipeline_tokens_per_s:,.0f} tok/s (measured on 2 cores)")
    print("| harvest | tokens | groups | shards | totals | shard rows | GPUs | harvest time | pipeline alone |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    # EC40: 80 directions x 30,000 pairs x ~70 tokens (source + target, Llama-3 tokenizer); 2 groups each
    print(plan("EC40, 80 directions", 80 * 30_000 * 70, 160, 80, 32, 14336, 1 << 20, args.gpus,
               args.gpu_tokens_per_s, args.pipeline_tokens_per_s))
    # Wikipedia: 10 languages x 100M tokens (the LAPE paper's amount)
    print(plan("Wikipedia, 10 languages", 10 * 100e6, 10, 10, 32, 14336, 1 << 20, args.gpus,
               args.gpu_tokens_per_s, args.pipeline_tokens_per_s))
    print(f"2-actor/1-actor throughput ratio: {two / one:.3f}")


if __name__ == "__main__":
    main()
