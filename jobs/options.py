"""The options of the job commands (``lsn intervene ppl|generate``, ``lsn finetune``, ``lsn demo``): one
dataclass per command, a docstring under each field, the defaults the jobs take too. Light: no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from harvester.devices import DeviceOptions
from harvester.errors import HarvestError
from harvester.options import Positive


def split_langs(text: str | None, flag: str) -> list[str] | None:
    """``"en, de"`` -> ``["en", "de"]``; None stays None; an empty list is refused naming ``flag``."""
    langs = [x.strip() for x in text.split(",") if x.strip()] if text is not None else None
    if text is not None and not langs:
        raise HarvestError(f"{flag} is empty")
    return langs


@dataclass(kw_only=True)
class RayOptions(DeviceOptions):
    """Where a job's model work runs, and what it may be given."""

    address: str | None = None
    """Ray cluster to join (none: $RAY_ADDRESS; without either, several actors run on an embedded local Ray
    instance)"""
    no_ray: bool = False
    """run everything in this process, without Ray's start-up, even with --actors 2+"""
    no_progress: bool = False
    """no progress bars"""
    allow_other_model: bool = False
    """apply a mask (or store statistics) from another model than --model: a deliberate transfer (refused
    otherwise)"""


@dataclass(kw_only=True)
class InterveneOptions(RayOptions):
    """What both ``lsn intervene`` commands take."""

    model: str
    """local path, hub id, or tiny:ARCH"""
    mask: str
    """mask file (.npz, from lsn analyze or lsn mask import)"""
    out: str
    """output directory"""
    mode: str = "zero"
    """zero | mean | mean-others (the mean over the mask's other languages) | p10 | p90 | value:X | add:X"""
    controls: int = 1
    """random-control rows per language (0: none)"""
    seed: int = 0
    """seed of the random controls"""
    langs: str | None = None
    """comma-separated mask languages (rows) and evaluated languages (none: the mask's)"""
    store: str | None = None
    """store for mean/p10/p90 and the site (none: the mask's)"""
    values_from: str | None = None
    """store whose mean/p10/p90 are written instead of --store's: one of the same model and tokenizer, e.g. a
    --unit gate store (Mondal et al.: gate projection statistics written into the activation's output)"""
    actors: Positive | None = None
    """model actors (none: one per GPU, 1 on CPU); one actor on this machine runs in this process, 2 or more
    on Ray"""

    def job(self) -> dict:
        """The keywords of a :class:`jobs.rows.Job` these options give."""
        return dict(model=self.model, mask=self.mask, out=self.out, mode=self.mode, controls=self.controls,
                    seed=self.seed, langs=split_langs(self.langs, "--langs"), store=self.store,
                    values_from=self.values_from, dtype=self.dtype,
                    device=self.device, actors=self.actors, use_ray=not self.no_ray, address=self.address,
                    progress=not self.no_progress, allow_other_model=self.allow_other_model)


Aggregate = Literal["tokens", "window-nll", "per-prompt"]
"""How ``lsn intervene ppl`` turns a column's next-token NLLs into one number (:mod:`jobs.ppl`)."""


@dataclass(kw_only=True)
class PPLOptions(InterveneOptions):
    corpus: list[str]
    """evaluation corpus spec (repeatable)"""
    seq_len: Positive = 256
    """tokens per evaluation window"""
    batch_size: Positive = 8
    """windows per forward pass"""
    max_tokens_per_lang: Positive | None = None
    """evaluation tokens per language (none: all)"""
    aggregate: Aggregate = "tokens"
    """how a column's next-token NLLs become one number. tokens: PPL = exp of their mean over all its predicted
    tokens. window-nll (LAPE's code): the mean over full --seq-len windows of each window's mean NLL, no exp,
    a shorter window (the remainder) dropped; LAPE's is --seq-len 4096 on running text. per-prompt (the
    alignment study's code): PPL = exp of the mean over examples of each example's mean NLL, the tokenizer's
    BOS first, an example cut at --seq-len tokens; needs a corpus of examples (instruct:FILE.jsonl)"""


LAPE_PPL: dict = {"aggregate": "window-nll", "seq_len": 4096}
"""LAPE's perplexity (RUCAIBox ``ppl.py``) as ``intervene ppl`` values (``--preset lape``): the mean NLL of
4,096-token windows (Llama-2's length), the remainder dropped, no exp. Its 2^20-token cap per language is
``--max-tokens-per-lang 1048576`` on a ``text:`` or ``wikipedia:`` corpus."""

LNA_PPL: dict = {"aggregate": "per-prompt", "seq_len": 4096}
"""The alignment study's perplexity (``language_neurons_alignment/ppl.py``) as ``intervene ppl`` values
(``--preset lna``): each instruction alone with the tokenizer's BOS, cut at 4,096 tokens, exp of the mean
over prompts of each prompt's mean NLL."""


@dataclass(kw_only=True)
class GenerateOptions(InterveneOptions):
    prompts: str
    """JSONL file, one {"lang": ..., "prompt": ...} per line"""
    max_new_tokens: Positive = 32
    """tokens generated per prompt"""
    sample: bool = False
    """sample (seeded) instead of greedy decoding"""
    temperature: float = 1.0
    """sampling temperature (with --sample)"""
    top_p: float = 1.0
    """nucleus sampling's probability mass (with --sample)"""


XNLIHead = Literal["verbalizer", "classifier"]
XQuADFormat = Literal["plain", "alpaca"]
XQuADSplit = Literal["splits", "first80", "shuffled80"]
SpecialTokens = Literal["tokenizer", "none"]


@dataclass(kw_only=True)
class FinetuneOptions(RayOptions):
    model: str
    """local path, hub id, or tiny:ARCH"""
    mask: str
    """mask file (.npz)"""
    lang: str
    """mask language(s) whose neurons are trained, comma-separated"""
    task: str
    """clm | xnli | xquad"""
    data: str
    """clm: a corpus spec; xnli/xquad: a hub id or DIR/{lang}/{split}.jsonl"""
    out: str
    """output directory"""
    control: str = "none"
    """comma-separated: none (the language's neurons) | random | full | base (no fine-tuning)"""
    train_lang: str = "en"
    """xnli/xquad: the language trained on"""
    eval_langs: str | None = None
    """xnli/xquad: comma-separated languages evaluated zero-shot"""
    eval_data: str | None = None
    """evaluation data (none: --data)"""
    steps: Positive = 100
    """training steps"""
    rank: Positive = 8
    """LoRA rank"""
    alpha: float = 16.0
    """LoRA alpha"""
    lr: float = 1e-3
    """learning rate"""
    batch_size: Positive = 8
    """examples per step"""
    seq_len: Positive = 256
    """tokens per example"""
    attention_lora: bool = False
    """also ordinary (unrestricted) LoRA on the attention projections of --attention-modules"""
    attention_modules: str = "q,k,v,o"
    """with --attention-lora: comma-separated from q, k, v, o (fused query_key_value models: q,k,v together)"""
    lora_modules: str = "all"
    """MLP projections whose neurons' rows (gate, up) or columns (down) the restricted LoRA trains:
    comma-separated from gate, up, down (non-gated MLPs: up, their input projection, and down), or all"""
    xnli_head: XNLIHead = "verbalizer"
    """verbalizer: the log-likelihood of " True"/" Neither"/" False" after a prompt. classifier: a linear head on
    the last non-pad position's final hidden state over "premise {eos} hypothesis" (the tokenizer's EOS
    written between), trained with the LoRA by cross-entropy and evaluated by argmax; saved as head.pt"""
    xquad_format: XQuADFormat = "plain"
    """plain: "{context}\\nQuestion: {question}\\nAnswer:" and " {answer}". alpaca: the Alpaca template of
    Mondal et al.'s code, verbatim (jobs.tasks.ALPACA), the answer followed by the tokenizer's EOS"""
    xquad_split: XQuADSplit = "splits"
    """splits: train on the data's train split, evaluate on validation. first80: google/xquad has only
    validation: train on its first 80% of rows, evaluate every language on the last 20% (in file order, no
    shuffle, as Mondal et al.; XQuAD's languages are parallel, so no question is seen in training).
    shuffled80: the same after a permutation seeded by --seed (one permutation for all languages)"""
    max_example_tokens: Positive | None = None
    """drop (and count) every example of more tokens than this, counted with the special tokens on the whole
    training text (the answer included) or the evaluation prompt. Mondal et al.: 510 for xquad (their
    "seq_len >= 512 - 1" rule), 255 for xnli ("seq_len < 256")"""
    special_tokens: SpecialTokens = "tokenizer"
    """tokenizer: encode each example as the tokenizer does by default (its BOS first, as every reference
    does); none: no special tokens (lsn before this option)"""
    prompt_loss: bool = False
    """train on the prompt's tokens too, not only the target's (Mondal et al.'s xquad loss)"""
    intervene: str = "zero"
    """test-time intervention on the evaluated language's neurons (a --mode of lsn intervene), or none"""
    store: str | None = None
    """store of --intervene mean|p10|p90 statistics (none: the mask's)"""
    max_train: Positive | None = None
    """training examples (none: all)"""
    max_eval: Positive | None = None
    """evaluation examples (none: all)"""
    seed: int = 0
    """seed of the random neurons, the initialisation and the data order"""


MONDAL_FINETUNE = {
    "xnli": dict(lora_modules="gate", attention_lora=True, attention_modules="q,k,v,o", xnli_head="classifier",
                 rank=64, alpha=128.0, lr=1e-6, batch_size=8, seq_len=256, max_example_tokens=255),
    "xquad": dict(lora_modules="gate", attention_lora=True, attention_modules="q,k,v", xquad_format="alpaca",
                  xquad_split="first80", rank=64, alpha=128.0, lr=5e-5, batch_size=4, seq_len=512,
                  max_example_tokens=510, prompt_loss=True),
}
"""``lsn finetune`` options of Mondal et al.'s setup (soumenkm/LangSpecificNeurons, code/models.py, dataset.py,
lora_cls_finetune.py, lora_instruct_finetune.py), per task: ``--preset mondal --task xnli|xquad``. Not expressible
here: their epochs (xnli 2 over the first 25% of train, xquad 10; set --steps), AdamW weight decay 0.1 and
betas (0.95, 0.999), gradient clipping at 10, a linear schedule with 1% warm-up, 4-bit NF4 base weights, and
LoRA A drawn from N(0, 0.01) (peft: Kaiming uniform)."""


@dataclass(kw_only=True)
class DemoOptions:
    out: str
    """output directory"""
    actors: Positive = 2
    """model actors"""
    no_progress: bool = False
    """no progress bars"""

