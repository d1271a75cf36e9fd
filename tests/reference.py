"""A plain reference harvest: per-window forward passes, hooks on each MLP, NumPy sums.

Independent of the package's window, batching, kernel and store code: it re-implements the
documented windowing with plain loops and recomputes each layer's activation from the MLP's input
(``act_fn(gate_proj(x))`` for gated MLPs, ``act(c_fc(x))`` for GPT-2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def reference_windows(corpus_dir: Path, tokenizer, seq_len: int) -> dict[str, list[list[int]]]:
    out = {}
    for file in sorted(corpus_dir.glob("*.txt")):
        stream = []
        for line in file.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                stream += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out[file.stem] = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    return out


def _activation(model, layer: int):
    """(module to hook, fn(mlp_input) -> activation [tokens, neurons])."""
    if model.config.model_type == "gpt2":
        mlp = model.transformer.h[layer].mlp
        return mlp, lambda x: mlp.act(mlp.c_fc(x))
    mlp = model.model.layers[layer].mlp
    return mlp, lambda x: mlp.act_fn(mlp.gate_proj(x))


def reference_stats(model_path: str, corpus_dir: Path, seq_len: int):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    groups = reference_windows(corpus_dir, tokenizer, seq_len)
    captured = {}
    handles = []
    for layer in range(n_layers):
        module, fn = _activation(model, layer)
        handles.append(module.register_forward_hook(
            lambda m, inputs, output, fn=fn, layer=layer: captured.__setitem__(layer, fn(inputs[0])[0].double().numpy())))
    tokens, active, act_sum, act_sqsum, abs_sum = {}, {}, {}, {}, {}
    with torch.inference_mode():
        for lang, windows in groups.items():
            tokens[lang] = 0
            for window in windows:
                model(input_ids=torch.tensor([window]))
                tokens[lang] += len(window)
                acts = np.stack([captured[layer] for layer in range(n_layers)])  # [L, S, I]
                active[lang] = active.get(lang, 0) + (acts > 0).sum(axis=1)
                act_sum[lang] = act_sum.get(lang, 0) + acts.sum(axis=1)
                act_sqsum[lang] = act_sqsum.get(lang, 0) + (acts ** 2).sum(axis=1)
                abs_sum[lang] = abs_sum.get(lang, 0) + np.abs(acts).sum(axis=1)
    for h in handles:
        h.remove()
    return tokens, active, act_sum, act_sqsum, abs_sum
