"""``lsn finetune``: LoRA on a language's neurons against random neurons, ordinary LoRA and no fine-tuning.

One condition per (language, control):

| control | trains |
| --- | --- |
| ``none`` | LoRA restricted to the language's neurons (:mod:`jobs.lora`) |
| ``random`` | LoRA restricted to a random mask with the same per-layer counts (seeded) |
| ``full`` | ordinary LoRA on the same modules, every neuron |
| ``base`` | nothing: the model as it is |

``--attention-lora`` adds ordinary LoRA on attention to the three LoRA conditions. ``--xnli-head classifier``
trains a linear head with the LoRA (``OUT/{lang}-{control}/head.pt``). Mondal et al.'s settings are
:data:`jobs.options.MONDAL_FINETUNE`.

Nothing is cut silently: every example cut to ``--seq-len`` (or, for generation, its prompt cut to
``--seq-len`` minus the 16-token answer cap), dropped over ``--max-example-tokens``, or whose generated
answer reaches the cap is counted per language and split, printed in one line and written to
``results.json`` (``truncation``).

For ``xnli`` and ``xquad`` the model trains on English (``--train-lang``) and is evaluated zero-shot
on every ``--eval-langs``. For ``clm`` it trains on the ``--data`` corpus and is evaluated by
perplexity on ``--eval-data``.

Each evaluation runs twice: as trained, and with a test-time intervention on the evaluated
language's own neurons (``--intervene MODE``, default ``zero``; :mod:`jobs.interventions`).

Each condition saves its adapter in peft's format under ``OUT/{lang}-{control}/adapter`` (the name
made safe as :mod:`harvester.names` says, e.g. ``OUT/en-fr%3Asrc-none``; never outside ``OUT``). It also
writes ``results.json`` with the metrics, the steps, the final loss, the trainable parameters, the
optimizer state's bytes, and the peak memory (CUDA's peak allocation on GPUs, the process's peak RSS
on CPU). On top of that it records whether, after merging, only the selected neurons' weights
changed. Conditions run as Ray tasks, one per condition in a fresh worker process, so each one's
peak memory is its own. The table is gathered into ``OUT/results.{json,csv,md}``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harvester import fs
from harvester.errors import HarvestError
from jobs.tasks import check_task
from jobs.options import FinetuneOptions

CONTROLS = ("none", "random", "full", "base")
ANSWER_CAP = 16
"""Tokens generated for an XQuAD answer; generation stops earlier at a newline or EOS."""
CONDITION = {"none": "language neurons", "random": "random neurons", "full": "full LoRA", "base": "no fine-tuning"}


@dataclass(kw_only=True)
class FinetuneJob:
    model: str
    mask: str
    langs: list[str]
    task: str
    data: str
    out: str
    controls: list[str] = field(default_factory=lambda: ["none"])
    train_lang: str = FinetuneOptions.train_lang
    eval_langs: list[str] | None = None
    eval_data: str | None = FinetuneOptions.eval_data
    steps: int = FinetuneOptions.steps
    rank: int = FinetuneOptions.rank
    alpha: float = FinetuneOptions.alpha
    lr: float = FinetuneOptions.lr
    batch_size: int = FinetuneOptions.batch_size
    seq_len: int = FinetuneOptions.seq_len
    attention_lora: bool = FinetuneOptions.attention_lora
    attention_modules: list[str] = field(default_factory=lambda: FinetuneOptions.attention_modules.split(","))
    lora_modules: list[str] = field(default_factory=lambda: FinetuneOptions.lora_modules.split(","))
    xnli_head: str = FinetuneOptions.xnli_head
    xquad_format: str = FinetuneOptions.xquad_format
    xquad_split: str = FinetuneOptions.xquad_split
    max_example_tokens: int | None = FinetuneOptions.max_example_tokens
    special_tokens: str = FinetuneOptions.special_tokens
    prompt_loss: bool = FinetuneOptions.prompt_loss
    intervene: str | None = FinetuneOptions.intervene
    max_train: int | None = FinetuneOptions.max_train
    max_eval: int | None = FinetuneOptions.max_eval
    seed: int = FinetuneOptions.seed
    dtype: str = FinetuneOptions.dtype
    device: str = FinetuneOptions.device
    """``auto`` values are resolved when the job is made (:func:`harvester.devices.resolve_here`)."""
    use_ray: bool = True
    """False: every condition in this process (``peak_memory_bytes`` is then the process's peak so far);
    True: each condition a Ray task in a fresh process, so its peak memory is its own."""
    address: str | None = FinetuneOptions.address
    progress: bool = True
    store: str | None = FinetuneOptions.store
    """The store of ``--intervene mean|p10|p90`` statistics (default: the mask's)."""
    allow_other_model: bool = FinetuneOptions.allow_other_model
    """Apply a mask (and store statistics) from another model than ``model``: a deliberate transfer."""

    def __post_init__(self):
        from harvester.devices import resolve_here

        self.device, self.dtype = resolve_here(self.device, self.dtype, use_ray=self.use_ray, address=self.address)


def condition_dir(job: FinetuneJob, lang: str, control: str) -> Path:
    """``OUT/{lang}-{control}``, the name made safe (:mod:`harvester.names`) and checked to lie inside ``OUT``."""
    from harvester.names import inside, path_part

    return inside(job.out, path_part(f"{lang}-{control}", "language"))


def check(job: FinetuneJob):
    """Every input checked before anything runs or is written; returns the mask."""
    from jobs.interventions import Mode
    from analysis.masks import Mask
    from harvester.names import path_parts
    from jobs.rows import check_langs

    check_task(job.task)
    bad = [c for c in job.controls if c not in CONTROLS]
    if bad or not job.controls:
        raise HarvestError(f"--control must be from {', '.join(CONTROLS)}, not '{','.join(bad or job.controls)}'")
    for name in ("steps", "rank", "batch_size", "seq_len", "alpha", "lr"):
        if not getattr(job, name) > 0:
            raise HarvestError(f"--{name.replace('_', '-')} must be positive, got {getattr(job, name)}")
    if job.seq_len < 2:
        raise HarvestError(f"--seq-len {job.seq_len} leaves no token to predict; give at least 2")
    if job.task == "xquad" and job.seq_len <= ANSWER_CAP:
        raise HarvestError(f"--seq-len {job.seq_len} leaves no room for an xquad prompt before the "
                           f"{ANSWER_CAP}-token answer; give more than {ANSWER_CAP}")
    if job.intervene is not None:
        Mode.parse(job.intervene)
    mask = Mask.load(job.mask)
    check_langs(mask, job.langs)
    if len(set(job.langs)) != len(job.langs):
        raise HarvestError(f"--lang names a language twice: {','.join(job.langs)}")
    path_parts([f"{lang}-{control}" for lang in job.langs for control in job.controls], "language")
    fs.output_dir(job.out, make=False)
    for lang in job.langs:
        condition_dir(job, lang, job.controls[0])
    empty = [lang for lang in job.langs if mask.selected[mask.index(lang)].size == 0 and set(job.controls) & {"none", "random"}]
    if empty:
        raise HarvestError(f"the mask selects no neuron for {', '.join(empty)}: nothing to train")
    return mask


def run_finetune(job: FinetuneJob) -> dict:
    mask = check(job)
    from harvester.backends.hf import load_config, resolve_model
    from jobs.lora import mlp_names, mlp_width, pick_modules
    from jobs.rows import check_models, check_shape

    config = load_config(resolve_model(job.model))
    pick_modules(mlp_names(config), job.lora_modules, job.attention_modules)  # refuses non-linear MLPs too
    check_shape((config.num_hidden_layers, mlp_width(config)), mask)
    store = intervention_store(job, mask)
    check_models(mask, job.model, store, job.allow_other_model)
    data = prepare_data(job)  # loads and checks every split before training starts
    print(truncation_line(data["truncation"]), file=sys.stderr)
    data["values"] = intervention_values(job, mask, store, data)
    conditions = [(lang, control) for lang in job.langs for control in job.controls]
    results = _run(job, conditions, data)
    table = gather(results)
    truncation = {"data": data["truncation"],
                  "conditions": {f"{r['lang']}-{r['control']}": r["truncation"] for r in results if r["truncation"]}}
    write_table(Path(job.out), table, job, truncation)
    return {"results": results, "table": table}


def intervention_store(job: FinetuneJob, mask) -> str | None:
    """The store ``--intervene mean|p10|p90`` reads (None for the other modes)."""
    from jobs.interventions import Mode
    from jobs.rows import find_store

    if job.intervene is None or not Mode.parse(job.intervene).needs_store:
        return job.store
    store = find_store(mask, job.store, f"--intervene {job.intervene}")
    if not store:
        raise HarvestError(f"--intervene {job.intervene} needs the store the mask was made from; pass --store")
    return store


def intervention_values(job: FinetuneJob, mask, store: str | None, data: dict) -> dict:
    """Per evaluated mask language, the ``[L, I]`` statistic ``--intervene mean|p10|p90`` sets its units to."""
    from jobs.interventions import Mode
    from jobs.rows import mode_values

    mode = Mode.parse(job.intervene) if job.intervene else None
    if mode is None or not mode.needs_store:
        return {}
    evaluated = data["groups"] if job.task == "clm" else list(data["eval"])
    return mode_values(store, mask, [lang for lang in evaluated if lang in mask.languages], mode)


def prepare_data(job: FinetuneJob) -> dict:
    """``{"train": [...], "eval": {lang: [...]}}`` of examples, or of windows for ``clm``."""
    from jobs.tasks import examples

    if job.task == "clm":
        from jobs.ppl import eval_windows

        groups, train = eval_windows(job.model, [job.data], job.seq_len, None)
        if job.eval_data:  # else the same corpus, windowed once
            groups, windows = eval_windows(job.model, [job.eval_data], job.seq_len, None)
        else:
            windows = train
        return {"train": train, "eval": windows, "groups": groups, "truncation": {}}
    from harvester.backends.hf import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(job.model))
    train_rows, eval_rows = task_rows(job)
    form = job.xnli_head if job.task == "xnli" else job.xquad_format
    eos = tokenizer.eos_token or ""
    if form in ("classifier", "alpaca") and not eos:
        raise HarvestError(f"--{job.task.replace('xnli', 'xnli-head').replace('xquad', 'xquad-format')} {form} "
                           "needs the tokenizer's EOS token, and this tokenizer has none")
    counts = {}
    train = counted(job, tokenizer, examples(job.task, train_rows, form, eos), True, counts, f"{job.train_lang}/train")
    evaluation = {lang: counted(job, tokenizer, examples(job.task, rows, form, eos), False, counts, f"{lang}/eval")
                  for lang, rows in eval_rows.items()}
    if not train:
        raise HarvestError(f"--max-example-tokens {job.max_example_tokens} drops every training example")
    return {"train": train, "eval": evaluation, "truncation": counts}


def task_rows(job: FinetuneJob) -> tuple[list[dict], dict[str, list[dict]]]:
    """Training rows and, per evaluated language, evaluation rows (``--xquad-split``, ``--max-train|eval``)."""
    from jobs.tasks import load_rows, split_rows

    langs = job.eval_langs or [job.train_lang]
    source = job.eval_data or job.data
    if job.task == "xquad" and job.xquad_split != "splits":
        train = split_rows(load_rows(job.task, job.data, job.train_lang, "validation", None), job.xquad_split,
                           job.seed)[0]
        evaluation = {lang: split_rows(load_rows(job.task, source, lang, "validation", None), job.xquad_split,
                                       job.seed)[1] for lang in langs}
    else:
        split = "test" if job.task == "xnli" else "validation"
        train = load_rows(job.task, job.data, job.train_lang, "train", None)
        evaluation = {lang: load_rows(job.task, source, lang, split, None) for lang in langs}
    return train[: job.max_train], {lang: rows[: job.max_eval] for lang, rows in evaluation.items()}


def counted(job: FinetuneJob, tokenizer, items: list, training: bool, counts: dict, key: str) -> list:
    """``items`` less those over ``--max-example-tokens``; ``counts[key]`` says how many were dropped and how
    many of the rest :func:`_batch` or generation will cut. Training and classifier inputs count whole;
    a verbalizer prompt with its longest label; a generation prompt against ``--seq-len`` minus the answer cap."""
    from jobs.tasks import XNLI_LABELS, encode

    special = job.special_tokens == "tokenizer"
    limit = job.seq_len - ANSWER_CAP if job.task == "xquad" and not training else job.seq_len
    kept, dropped, cut = [], 0, 0
    for ex in items:
        p, t = encode(tokenizer, ex.prompt, ex.target if training else "", special)
        if job.max_example_tokens is not None and len(p) + len(t) > job.max_example_tokens:
            dropped += 1
            continue
        n = len(p) + len(t)
        if not training and job.task == "xnli" and job.xnli_head == "verbalizer":
            n = max(sum(map(len, encode(tokenizer, ex.prompt, label, special))) for label in XNLI_LABELS)
        cut += n > limit
        kept.append(ex)
    counts[key] = {"examples": len(items), "dropped_over_max_example_tokens": dropped, "cut_to_seq_len": cut}
    return kept


def truncation_line(counts: dict) -> str:
    """One line: what was cut or dropped, per language and split."""
    if not counts:
        return "truncation: none (clm windows are --seq-len tokens by construction)"
    parts = [f"{key} {c['cut_to_seq_len']} of {c['examples']} cut to --seq-len, "
             f"{c['dropped_over_max_example_tokens']} dropped over --max-example-tokens" for key, c in counts.items()]
    return "truncation: " + "; ".join(parts)


def _run(job: FinetuneJob, conditions: list[tuple[str, str]], data: dict) -> list[dict]:
    from tqdm.auto import tqdm

    from harvester.devices import start_line

    on_ray = job.use_ray  # Ray buys a fresh process per condition, hence its own peak memory
    if job.progress:
        print(start_line(job.device, job.dtype, on_ray), file=sys.stderr)
    bar = tqdm(total=len(conditions), unit="condition", desc="finetune", disable=not job.progress, file=sys.stderr)
    try:
        if not on_ray:
            out = []
            for lang, control in conditions:
                out.append(run_condition(job, lang, control, data))
                bar.update()
            return out
        import ray

        from harvester.driver import ray_get, ray_init

        started = ray_init(job.address)
        try:
            options = dict(num_gpus=1, num_cpus=1) if job.device.startswith("cuda") else dict(num_cpus=1)
            task = ray.remote(max_calls=1, max_retries=0, **options)(run_condition)  # a fresh process each
            data_ref = ray.put(data)
            refs = {task.remote(job, lang, control, data_ref): k for k, (lang, control) in enumerate(conditions)}
            out: list = [None] * len(conditions)
            while refs:
                (done,), _ = ray.wait(list(refs), num_returns=1)
                out[refs.pop(done)] = ray_get(ray, done)
                bar.update()
            return out
        finally:
            if started:
                ray.shutdown()
    finally:
        bar.close()


def run_condition(job: FinetuneJob, lang: str, control: str, data: dict) -> dict:
    """Train (unless ``base``), save the adapter, evaluate with and without the intervention."""
    import torch
    from transformers import AutoModelForCausalLM

    from analysis.methods import random_control
    from harvester.backends.hf import DTYPES, load_tokenizer, resolve_model
    from jobs.lora import add_restricted_lora, bake, changed_neurons
    from analysis.masks import Mask

    torch.manual_seed(job.seed)
    path = resolve_model(job.model)
    tokenizer = load_tokenizer(path)
    mask = Mask.load(job.mask)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[job.dtype]).to(job.device)
    own = mask.selected[mask.index(lang)]
    selected = {"none": own, "random": random_control([own], mask.n_layers, mask.width, job.seed)[0],
                "full": None}.get(control)
    out_dir = fs.output_dir(condition_dir(job, lang, control))
    record = {"lang": lang, "control": control, "condition": CONDITION[control], "task": job.task,
              "units": None if selected is None else int(len(selected))}
    head = classifier_head(job, model)
    started = time.perf_counter()
    if control != "base":
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model = add_restricted_lora(model, selected, mask.width, job.rank, job.alpha, job.attention_lora,
                                    modules=tuple(job.lora_modules), attention_modules=tuple(job.attention_modules))
        record.update(train(model, tokenizer, job, data, head))
        bake(model)
        model.save_pretrained(out_dir / "adapter")
        if head is not None:
            torch.save(head.state_dict(), out_dir / "head.pt")
        model = model.merge_and_unload()
        changed = changed_neurons(base_state, model, model.config, mask.width)
        changed_flat = np.concatenate([units + layer * mask.width for layer, units in changed.items()])
        outside = changed_flat if selected is None else np.setdiff1d(changed_flat, selected)
        record.update(changed_neurons=int(changed_flat.size),
                      changed_outside_selection=None if selected is None else int(outside.size))
        del base_state
    record["train_seconds"] = time.perf_counter() - started
    model.eval()
    record["truncation"] = {}
    record["eval"] = evaluate(model, tokenizer, job, data, mask, head, record["truncation"])
    record["peak_memory_bytes"] = peak_memory(job.device)
    if record["truncation"]:
        print(f"truncation {lang}-{control}: " + "; ".join(f"{k} {v['answers_at_cap']} of {v['answers']} answers reached "
              f"the {ANSWER_CAP}-token cap" for k, v in record["truncation"].items()), file=sys.stderr)
    fs.write_text(str(out_dir / "results.json"), json.dumps(record, indent=2))
    return record


def classifier_head(job: FinetuneJob, model):
    """``--xnli-head classifier``: a fresh (seeded) linear map from the last hidden state to the three labels."""
    import torch

    if job.task != "xnli" or job.xnli_head != "classifier":
        return None
    return torch.nn.Linear(model.config.hidden_size, 3).to(job.device)


def last_hidden(model, ids, attention):
    """``[batch, hidden]``: the final hidden state (after the final norm) at each row's last non-pad position
    (rows are right-padded)."""
    import torch

    states = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
    return states[torch.arange(ids.shape[0], device=ids.device), attention.sum(1) - 1].float()


def _batch(tokenizer, items, seq_len: int, pad_id: int, special: bool = False, prompt_loss: bool = False):
    """Right-padded ``(ids, attention, labels)``, each example cut to its last ``seq_len`` tokens; labels are
    -100 on padding and (unless ``prompt_loss``) on prompts."""
    import torch

    from jobs.tasks import encode

    rows = []
    for prompt, target in items:
        p, t = encode(tokenizer, prompt, target, special)
        ids = (p + t)[-seq_len:]
        labels = ((p if prompt_loss else [-100] * len(p)) + t)[-seq_len:]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for k, (i, l) in enumerate(rows):
        ids[k, : len(i)], attention[k, : len(i)], labels[k, : len(l)] = torch.tensor(i), 1, torch.tensor(l)
    return ids, attention, labels


def train(model, tokenizer, job: FinetuneJob, data: dict, head=None) -> dict:
    import torch

    from harvester.windows import batches

    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    optimizer = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    draw = np.random.default_rng(job.seed)
    train_items = data["train"]
    model.train()
    loss = None
    for _ in range(job.steps):
        picks = draw.integers(0, len(train_items), job.batch_size)
        if job.task == "clm":
            ids, attention, _ = (torch.from_numpy(a) for a in next(batches([train_items[i] for i in picks],
                                                                            job.batch_size, pad_id)))
            labels = ids.masked_fill(attention == 0, -100)
        else:
            ids, attention, labels = _batch(tokenizer, [(train_items[i].prompt, train_items[i].target) for i in picks],
                                            job.seq_len, pad_id, job.special_tokens == "tokenizer", job.prompt_loss)
        ids, attention, labels = ids.to(device), attention.to(device), labels.to(device)
        if head is not None:
            target = torch.tensor([train_items[i].label for i in picks], device=device)
            loss = torch.nn.functional.cross_entropy(head(last_hidden(model, ids, attention)), target)
        else:
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    return {"steps": job.steps, "final_loss": loss.item(), "trainable_parameters": int(sum(p.numel() for p in params)),
            "optimizer_state_bytes": int(state_bytes)}


def evaluate(model, tokenizer, job: FinetuneJob, data: dict, mask, head=None, caps: dict | None = None) -> dict:
    """Per evaluated language: the task's metrics, as trained and with the test-time intervention; ``caps``
    gets, per language, how many generated answers reached the answer cap (as trained)."""
    from harvester import arch
    from jobs.interventions import Intervention, Mode, intervene

    site = arch.resolve_site(model.config, None, "mlp")
    mode = Mode.parse(job.intervene) if job.intervene else None

    def intervention(lang: str):
        if mode is None or lang not in mask.languages:
            return None
        return Intervention(mask.selected[mask.index(lang)], mode, mask.width, data.get("values", {}).get(lang))

    if job.task == "clm":
        from jobs.ppl import group_nll

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        groups = data["groups"]
        base = group_nll(model, data["eval"], len(groups), job.batch_size, pad_id)
        out = {}
        for g, lang in enumerate(groups):
            out[lang] = {"ppl": _ppl(base, g)}
            iv = intervention(lang)
            if iv is not None:
                with intervene(model, site, iv):
                    out[lang]["ppl_intervened"] = _ppl(group_nll(model, data["eval"], len(groups), job.batch_size, pad_id), g)
        return out
    out = {}
    for lang, items in data["eval"].items():
        counts = {"answers": 0, "answers_at_cap": 0}
        out[lang] = score(model, tokenizer, job, items, head, counts)
        if job.task == "xquad" and caps is not None:
            caps[f"{lang}/eval"] = counts
        iv = intervention(lang)
        if iv is not None:
            with intervene(model, site, iv):
                out[lang].update({f"{k}_intervened": v for k, v in score(model, tokenizer, job, items, head).items()})
    return out


def _ppl(nll_count, g: int) -> float:
    total, count = nll_count
    return float(math.exp(total[g] / count[g])) if count[g] else float("nan")


def continuation_scores(model, tokenizer, prompt: str, continuations, seq_len: int, special: bool):
    """``[len(continuations)]``: the log-likelihood of each continuation after ``prompt``, on the tokens of
    ``prompt + continuation`` tokenized whole (:func:`jobs.tasks.encode`)."""
    import torch

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, attention, labels = _batch(tokenizer, [(prompt, c) for c in continuations], seq_len, pad_id, special)
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
    target = labels[:, 1:].to(device)
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return (logp * (target != -100)).sum(-1)


def score(model, tokenizer, job: FinetuneJob, items, head=None, counts: dict | None = None) -> dict:
    import torch

    from jobs.tasks import XNLI_LABELS, encode, exact_match, f1

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = job.special_tokens == "tokenizer"
    if job.task == "xnli":
        correct = 0
        with torch.inference_mode():
            if head is not None:
                for start in range(0, len(items), job.batch_size):
                    chunk = items[start: start + job.batch_size]
                    ids, attention, _ = _batch(tokenizer, [(ex.prompt, "") for ex in chunk], job.seq_len, pad_id, special)
                    predicted = head(last_hidden(model, ids.to(device), attention.to(device))).argmax(-1).tolist()
                    correct += sum(int(p == ex.label) for p, ex in zip(predicted, chunk))
            for ex in items if head is None else ():
                scores = continuation_scores(model, tokenizer, ex.prompt, XNLI_LABELS, job.seq_len, special)
                correct += int(int(scores.argmax()) == ex.label)
        return {"accuracy": correct / len(items)}
    em = f = 0.0
    counts = {} if counts is None else counts
    newline = set(tokenizer("\n", add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        for ex in items:
            prompt = encode(tokenizer, ex.prompt, "", special)[0][-(job.seq_len - ANSWER_CAP):]
            ids = torch.tensor([prompt], device=device)
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_CAP, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
            cut = next((k for k, t in enumerate(new) if t in newline or t == tokenizer.eos_token_id), len(new))
            counts["answers"] = counts.get("answers", 0) + 1
            counts["answers_at_cap"] = counts.get("answers_at_cap", 0) + int(cut == ANSWER_CAP)
            prediction = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
            em += exact_match(prediction, ex.answers)
            f += f1(prediction, ex.answers)
    return {"exact_match": em / len(items), "f1": f / len(items)}


def peak_memory(device: str) -> int:
    import resource

    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def gather(results: list[dict]) -> list[dict]:
    """One row per (language, condition, evaluated language, metric)."""
    rows = []
    for r in results:
        for eval_lang, metrics in r["eval"].items():
            for name, value in metrics.items():
                if name.endswith("_intervened"):
                    continue
                rows.append({"lang": r["lang"], "condition": r["condition"], "eval_lang": eval_lang, "metric": name,
                             "value": value, "intervened": metrics.get(f"{name}_intervened"),
                             "trainable_parameters": r.get("trainable_parameters", 0),
                             "peak_memory_mib": r["peak_memory_bytes"] / 2**20})
    return rows


def write_table(out: Path, table: list[dict], job: FinetuneJob, truncation: dict | None = None) -> None:
    import pandas as pd

    from jobs.generate import markdown

    fs.output_dir(out)
    frame = pd.DataFrame.from_records(table)
    fs.write_text(str(out / "results.csv"), frame.to_csv(index=False, float_format="%.6g"))  # whole or not at all
    fs.write_text(str(out / "results.md"), markdown(frame))
    fs.write_text(str(out / "results.json"), json.dumps({"settings": asdict(job), "truncation": truncation or {}, "table": table}, indent=2,
                                                        default=str))

