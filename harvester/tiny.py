"""Built-in tiny models (``--model tiny:ARCH``): random weights from a config, no download.

A byte-level BPE tokenizer is trained in memory on the sample corpus, the model is built with
``AutoModelForCausalLM.from_config`` from a seed, and both are saved under the cache directory
(``$LSN_CACHE``, default ``~/.cache/lsn-harvester``), so they then load through the same
``from_pretrained`` code as any local or hub model.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import tempfile
from pathlib import Path

from harvester.arch import ARCHS
from harvester.errors import HarvestError

VOCAB = 1024
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
_TINY_VERSION = 2  # 2: head size 32, the smallest vLLM's CPU attention accepts

CONFIGS: dict[str, dict] = {name: record.tiny for name, record in ARCHS.items()}
"""``tiny:ARCH`` -> its config keywords: a view of the records in :data:`harvester.arch.ARCHS`."""


def cache_dir() -> Path:
    return Path(os.environ.get("LSN_CACHE", Path.home() / ".cache" / "lsn-harvester"))


def train_tokenizer(vocab_size: int = VOCAB, seed: int = 0):
    """A byte-level BPE tokenizer trained on the sample corpus, as a ``PreTrainedTokenizerFast``."""
    return copy.deepcopy(_train_tokenizer(vocab_size, seed))


@functools.lru_cache(maxsize=2)
def _train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from harvester.corpus.sample import SampleCorpus

    corpus = SampleCorpus.from_spec("sample", f"docs=60,seed={seed}")
    texts = [doc for lang in corpus.groups for doc in corpus.texts(lang)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=512)


def tiny_model(arch: str, seed: int = 0):
    """A random tiny ``arch`` causal LM (float32) sized for tests and demos."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **{"tie_word_embeddings": False, **CONFIGS[arch]})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tiny_path(spec: str) -> Path:
    """Resolve ``tiny:ARCH`` to a saved model directory, building it on first use."""
    arch = spec.partition(":")[2]
    if arch not in CONFIGS:
        raise HarvestError(f"unknown built-in model '{spec}'; available: " + ", ".join(f"tiny:{a}" for a in CONFIGS))
    path = cache_dir() / f"tiny-{arch}-v{_TINY_VERSION}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=path.parent))
    tiny_model(arch).save_pretrained(tmp)
    train_tokenizer().save_pretrained(tmp)
    try:
        tmp.rename(path)  # atomic: concurrent builders race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
