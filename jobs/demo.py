"""The demo model, and ``lsn demo``: the whole chain on a model the project trains itself.

The demo model is a small Llama trained from scratch on the built-in sample corpus (12 languages in 8
scripts, pseudo-sentences of real words; :mod:`harvester.corpus.sample`). Training is seeded and takes
minutes on 2 CPU cores. The model is saved under the cache directory (``$LSN_CACHE``) and reused.
Training uses its own documents (``seed=11``); the harvest uses the default sample documents
(``seed=0``) and the evaluation other ones (``seed=7``), so the three never share a document.

``lsn demo --out DIR`` runs train or load → harvest → LAPE masks (with their bootstrap stability) →
perplexity matrix with random controls → generation table → ``DIR/report.md`` with the PNG plots.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path


DEMO_VERSION = 1
CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=512, hidden_act="relu")
"""A Llama with a ReLU-gated MLP. At this size a SiLU-gated MLP spreads each language over many
weakly selective neurons, and switching off even 20% of them barely moves perplexity (see
benchmarks/RESULTS.md); ReLU gates give sparse, selective neurons."""
TRAIN = dict(docs=400, seed=11, seq_len=128, batch_size=32, steps=800, lr=3e-3, warmup=0.1)
HARVEST_CORPUS = "sample"
EVAL_CORPUS = "sample:docs=40,seed=7"
LAPE_TOP_RATE = 0.2
DEMO_SHARD_TOKENS = 2048
"""Shards of 2 batches (8 x 128 tokens each): 6 to 8 per language, the units the bootstrap resamples. The
batches are those of larger shards (shards end at batch boundaries), so the counts are the same."""
BOOTSTRAP = 20
"""LAPE's bootstrap resamples of the demo store (the stability section of the report)."""


def demo_path() -> Path:
    from harvester.tiny import cache_dir

    return cache_dir() / f"demo-llama-v{DEMO_VERSION}"


def demo_model(progress: bool = True) -> Path:
    """The trained demo model's directory, trained on first use."""
    path = demo_path()
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    try:
        train(tmp, progress=progress)
        tmp.rename(path)  # atomic: a concurrent trainer loses the race harmlessly
    except OSError:
        if not (path / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def training_windows(tokenizer, docs: int, seed: int, seq_len: int):
    """Each language's documents (each followed by EOS) packed into windows of ``seq_len`` tokens; a
    window never mixes languages."""
    import numpy as np
    import torch

    from harvester.corpus.sample import LANGUAGES, SampleCorpus
    from harvester.windows import windows_of

    corpus = SampleCorpus.from_spec("sample", f"docs={docs},seed={seed}")
    rows = []
    for lang in LANGUAGES:
        docs_ids = [ids + [tokenizer.eos_token_id] for ids in
                    tokenizer(list(corpus.texts(lang)), add_special_tokens=False)["input_ids"]]
        rows += [w for w in windows_of(docs_ids, seq_len) if len(w) == seq_len]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def train(out: Path, progress: bool = True) -> None:
    """Train the demo model from a seed into ``out`` (weights and tokenizer)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from harvester.tiny import VOCAB, train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer()
    data = training_windows(tokenizer, TRAIN["docs"], TRAIN["seed"], TRAIN["seq_len"])
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=False, **CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    steps = TRAIN["steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=TRAIN["lr"], total_steps=steps,
                                                   pct_start=TRAIN["warmup"])
    draw = torch.Generator().manual_seed(0)
    bar = tqdm(range(steps), desc="train demo model", unit="step", disable=not progress, file=sys.stderr)
    for _ in bar:
        batch = data[torch.randint(0, len(data), (TRAIN["batch_size"],), generator=draw)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lsn-demo.json").write_text(json.dumps({"version": DEMO_VERSION, "config": CONFIG, "train": TRAIN,
                                                   "final_loss": loss.item()}, indent=2))


def write_prompts(path: Path, per_lang: int = 2, words: int = 6) -> Path:
    """Prompts: the first words of held-out sample documents (``seed=5``), ``per_lang`` per language."""
    from harvester.corpus.sample import LANGUAGES, SampleCorpus

    corpus = SampleCorpus.from_spec("sample", f"docs={per_lang},seed=5")
    with path.open("w", encoding="utf-8") as f:
        for lang in LANGUAGES:
            for text in corpus.texts(lang):
                prompt = text[: 3 * words] if lang in ("zh", "ja") else " ".join(text.split()[:words])
                f.write(json.dumps({"lang": lang, "prompt": prompt}, ensure_ascii=False) + "\n")
    return path


def run_demo(out: str, actors: int = 2, progress: bool = True) -> Path:
    """The whole chain into ``out``, each step the function its ``lsn`` command runs; returns the report."""
    from analysis.cli import ExportOptions, LapeOptions, analyze, export_mask
    from harvester.cli import harvest
    from harvester.config import HarvestOptions
    from jobs.cli import generate, ppl
    from jobs.options import GenerateOptions, PPLOptions

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    model, quiet = str(demo_model(progress)), not progress
    store, mask = str(root / "store"), str(root / "lape.npz")
    harvest(HarvestOptions(model=model, corpus=[HARVEST_CORPUS], store=store, seq_len=128, batch_size=8,
                           shard_tokens=DEMO_SHARD_TOKENS, actors=actors, stats="active,sum,sqsum,hist", no_progress=quiet))
    analyze(LapeOptions(store=store, out=mask, top_rate=LAPE_TOP_RATE, report=str(root / "lape-report"),
                        bootstrap=BOOTSTRAP, no_progress=quiet))
    export_mask(ExportOptions(mask=mask, out=str(root / "lape.pt")))
    ppl(PPLOptions(model=model, mask=mask, corpus=[EVAL_CORPUS], out=str(root / "ppl"), seq_len=128, controls=1,
                   actors=actors, no_progress=quiet))
    prompts = write_prompts(root / "prompts.jsonl")
    generate(GenerateOptions(model=model, mask=mask, prompts=str(prompts), out=str(root / "generate"),
                             max_new_tokens=24, controls=1, actors=actors, no_progress=quiet))
    return write_report(root, model)


def known_answer(ppl_csv: Path) -> dict:
    """The demo's check: per language L, is L's relative PPL rise the largest in row L, and is the
    random control's rise of L's PPL under half of L's own?"""
    import pandas as pd

    table = pd.read_csv(ppl_csv, index_col=0)
    relative = table / table.loc["none"] - 1
    langs = [c for c in table.columns if c in table.index]
    own = {lang: float(relative.loc[lang, lang]) for lang in langs}
    diagonal = {lang: own[lang] > max(float(relative.loc[lang, c]) for c in table.columns if c != lang) for lang in langs}
    control = {lang: float(relative.loc[f"random:{lang}", lang]) for lang in langs if f"random:{lang}" in relative.index}
    below_half = {lang: control[lang] < 0.5 * own[lang] for lang in control}
    return {"own": own, "diagonal": diagonal, "control": control, "below_half": below_half,
            "diagonal_share": sum(diagonal.values()) / len(langs), "controls_below_half": all(below_half.values())}


def stability_section(mask_path: Path) -> list[str]:
    """The report's section on how stable the LAPE mask is over bootstrap resamples of the store's shards."""
    import pandas as pd

    from analysis.masks import Mask
    from jobs.generate import markdown

    mask = Mask.load(mask_path)
    boot = mask.bootstrap
    band = boot.band()
    table = pd.DataFrame({"language": mask.languages, "full": [s.size for s in mask.selected],
                          "stable": [s.size for s in boot.stable_selected()], "Jaccard mean": band[:, 0],
                          "Jaccard 5%": band[:, 1], "Jaccard 95%": band[:, 2]})
    shards = sorted(set(boot.shards.values()))
    return [
        "## Stability: LAPE over bootstrap resamples of the store's shards",
        "",
        f"{boot.resamples} resamples (seed {boot.seed}): each language's shards ({shards[0]} to {shards[-1]} per "
        "language) drawn with replacement, LAPE run again on each. Stable: selected in at least "
        f"{boot.need} of {boot.resamples} resamples. Jaccard: a resample's mask against the mask above "
        "(`lape-report/report.md` has the whole section, `lape-report/stability*.csv` the numbers).",
        "",
        markdown(table),
        "![selection frequency](lape-report/stability_frequency.png)",
        "",
        "![stable and full neurons per layer](lape-report/stability_layers.png)",
        "",
    ]


def write_report(root: Path, model: str) -> Path:
    import pandas as pd

    from jobs.generate import markdown

    check = known_answer(root / "ppl" / "ppl.csv")
    relative = pd.read_csv(root / "ppl" / "ppl_relative.csv", index_col=0)
    generation = pd.read_csv(root / "generate" / "generate.csv")
    lines = [
        "# lsn demo",
        "",
        f"Model: the demo model (`{model}`), trained on the sample corpus; harvest of `{HARVEST_CORPUS}`, "
        f"LAPE masks (top rate {LAPE_TOP_RATE}), perplexity on `{EVAL_CORPUS}`, neurons set to zero.",
        "",
        "## Perplexity: relative change when a language's neurons are switched off",
        "",
        "Rows: intervened neurons (`random:L` has as many random neurons per layer as L's mask). "
        "Columns: evaluated language. `ppl/ppl.csv` has the perplexities, `ppl/ppl_change.csv` the PPXC.",
        "",
        "![relative PPL change](ppl/ppl_relative.png)",
        "",
        markdown(relative.reset_index()),
        "## Known answer",
        "",
        f"- L's own neurons raise L's perplexity relatively more than any other language's: "
        f"{sum(check['diagonal'].values())} of {len(check['diagonal'])} languages "
        f"({100 * check['diagonal_share']:.0f}%).",
        f"- The random control raises L's perplexity by less than half as much as L's own neurons: "
        f"{sum(check['below_half'].values())} of {len(check['below_half'])} languages.",
        "",
        markdown(pd.DataFrame({"language": list(check["own"]), "own": list(check["own"].values()),
                               "random": [check["control"].get(k, float("nan")) for k in check["own"]],
                               "largest in row": list(check["diagonal"].values()),
                               "random < own / 2": [check["below_half"].get(k, False) for k in check["own"]]})),
        "## Generation",
        "",
        "Per intervened row and prompt language: share of outputs in the prompt's language (lingua), "
        "mean length in tokens, stop-word share, overlap with the prompt (`generate/generate.md` has every column, "
        "`generate/generate.json` every output).",
        "",
        markdown(generation[["intervened", "prompt_lang", "in_prompt_lang", "length", "stopwords", "prompt_overlap"]]),
        "## Masks",
        "",
        "![neurons per layer](lape-report/counts.png) ![overlap](lape-report/overlap_jaccard.png)",
        "",
        "`lape.npz` (this tool's format), `lape.pt` (the published list-of-LongTensor format), `lape-report/`.",
        "",
        *stability_section(root / "lape.npz"),
    ]
    path = root / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    (root / "known_answer.json").write_text(json.dumps(check, indent=2))
    return path
