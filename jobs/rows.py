"""What the intervention jobs share: checking their inputs (:func:`make_plan`), their rows (one
intervention each), and running the rows on Ray actors that load the model once (without Ray, one
after another in this process).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from harvester.errors import HarvestError
from jobs.options import InterveneOptions


@dataclass(kw_only=True)
class Job:
    """Settings every intervention job has."""

    model: str
    mask: str
    out: str
    mode: str = InterveneOptions.mode
    controls: int = InterveneOptions.controls
    seed: int = InterveneOptions.seed
    langs: list[str] | None = None
    store: str | None = InterveneOptions.store
    """For the statistic modes and the site; default: the store the mask was made from."""
    values_from: str | None = InterveneOptions.values_from
    """Another store of the same model and tokenizer whose statistics the statistic modes write (a
    ``--unit gate`` store: Mondal et al.'s setup); default: ``store``."""
    dtype: str = InterveneOptions.dtype
    device: str = InterveneOptions.device
    """``auto`` values are resolved when the job is made (:func:`harvester.devices.resolve_here`)."""
    actors: int | None = InterveneOptions.actors
    use_ray: bool = True
    """False: every row in this process; True: on Ray where it buys something (:func:`harvester.devices.wants_ray`)."""
    address: str | None = InterveneOptions.address
    progress: bool = True
    allow_other_model: bool = InterveneOptions.allow_other_model
    """Apply a mask (and store statistics) from another model than ``model``: a deliberate transfer."""

    def __post_init__(self):
        from harvester.devices import resolve_here

        self.device, self.dtype = resolve_here(self.device, self.dtype, use_ray=self.use_ray, address=self.address)


@dataclass(frozen=True)
class Row:
    name: str
    language: str | None
    """The mask language whose statistics the statistic modes use (None: the ``none`` row)."""
    selected: tuple[int, ...] = ()


def mask_groups(mask, language: str) -> tuple[list[str], list[str]]:
    """``(groups, minus)``: the store groups a mask language was summed from (its own name when the mask
    does not say), and those subtracted from them (a full-minus-prompt language: ``[L:prompt]``). A mask
    made before masks recorded ``subtracted`` is taken as full minus prompt when its groups are
    exactly ``L:full`` and ``L:prompt``, which is what ``--response-only`` made of them."""
    groups = mask.source.get("groups")
    if not groups or len(groups) != len(mask.languages):
        return [language], []
    k = mask.languages.index(language)
    groups = list(groups[k])
    subtracted = mask.source.get("subtracted")
    if subtracted is not None and len(subtracted) == len(mask.languages):
        minus = bool(subtracted[k])
    else:
        minus = groups == [f"{language}:full", f"{language}:prompt"]
    return (groups[:1], groups[1:]) if minus else (groups, [])


def mode_values(store: str, mask, langs, mode) -> dict:
    """Per language of ``langs`` (the mask's), the ``[L, I]`` values ``mode`` sets its units to: its own
    statistic, or with ``mean-others`` the unweighted mean of the other mask languages' means."""
    if mode.kind != "mean-others":
        return {lang: language_statistic(store, mask, lang, mode) for lang in langs}
    if len(mask.languages) < 2:
        raise HarvestError(f"--mode mean-others needs a mask of two languages or more; it has {mask.languages[0]}")
    means = {lang: language_statistic(store, mask, lang, mode) for lang in mask.languages}
    return {lang: np.mean([means[o] for o in mask.languages if o != lang], axis=0) for lang in langs}


def language_statistic(store: str, mask, language: str, mode) -> np.ndarray:
    """``[L, I]``: the statistic ``mode`` sets a mask language's units to, from its groups in ``store``."""
    from jobs.interventions import unit_statistic

    groups, minus = mask_groups(mask, language)
    return unit_statistic(store, groups, mode, minus)


def site_of(store: str | None, config, recorded: str | None = None) -> str:
    """The module the statistics were taken at: the store's recorded site, else (no store) the site the
    mask records, else the MLP activation, which the mask's shape is then checked against."""
    from harvester import arch
    from harvester.store import open_finished

    if store:
        return open_finished(store).model.site
    return recorded or arch.resolve_site(config, None, "mlp")


def unit_of(store: str | None, mask) -> str:
    """The ``--unit`` the mask's units are: the store's, else the mask's record, else MLP neurons."""
    from harvester.store import open_finished

    if store:
        return open_finished(store).model.unit or "mlp"
    return mask.source.get("unit") or "mlp"


def find_store(mask, given: str | None, needed: str | None = None) -> str | None:
    """The store a job reads (:meth:`analysis.masks.Mask.find_store`), its note printed. A recorded store
    that is not there is an error naming --store when ``needed`` (what needs it) says so, or when the mask
    records no site to intervene at without it (an older mask)."""
    store, note = mask.find_store(given)
    if store is None and note and (needed or not mask.source.get("site")):
        raise HarvestError(f"{needed or 'an older mask, which records no site,'} needs the store the mask was made "
                           f"from: {note}")
    if note:
        print(f"lsn: {note}" + ("" if store else f"; intervening at the site the mask records, {mask.source['site']}"),
              file=sys.stderr)
    return store


def check_models(mask, model: str, store: str | None, allow_other: bool) -> None:
    """The mask, and the store whose statistics or site a job reads, must come from the model it runs
    (compared by weights hash, else id and revision); each note (a transfer asked for, or a check by
    shape alone) is printed on one line."""
    from harvester.store import open_finished
    from analysis.masks import check_applied, model_identity, same_model
    from harvester.backends.hf import load_config, model_identity as loaded_identity, resolve_model

    path = resolve_model(model)
    target = loaded_identity(model, path, load_config(path))
    shape = f"{mask.n_layers} x {mask.width}"
    notes = [mask.check_model(target, "--model", allow_other)]
    if store:
        model = open_finished(store).model
        if (model.layers, model.width) != (mask.n_layers, mask.width):
            raise HarvestError(f"the mask is for {shape} units, but store {store} has {model.layers} x {model.width}")
        origin = model_identity(model.to_dict())
        if not same_model(origin, mask.identity()):  # the mask's own check covered the store's model
            notes.append(check_applied(origin, f"store {store} was harvested on", target, "--model", shape,
                                       allow_other))
    for note in dict.fromkeys(n for n in notes if n):
        print(f"lsn: {note}", file=sys.stderr)


@dataclass
class Plan:
    """What a job intervenes on: the mask, the mode, the site, per-unit values and the rows (one
    per chosen language, plus controls)."""

    mask: object
    mode: object
    store: str | None
    site: str
    values: dict
    rows: list[Row]
    values_from: str | None = None
    """The store the values came from when not ``store`` (``--values-from``)."""
    unit: str = "mlp"
    """The store's (or mask's) ``--unit``: ``down-input`` units are the site's input, the others its output."""


def make_plan(model: str, mask_path: str, langs: list[str] | None, store: str | None, mode_text: str,
              controls: int, seed: int, allow_other_model: bool = False, values_from: str | None = None) -> Plan:
    """Check a job's inputs (before any output is written) and resolve what it needs."""
    from analysis.masks import Mask
    from harvester.backends.hf import load_config, resolve_model
    from jobs.interventions import Mode

    mode = Mode.parse(mode_text)
    mask = Mask.load(mask_path)
    langs = langs or list(mask.languages)
    check_langs(mask, langs)
    if values_from and not mode.needs_store:
        raise HarvestError(f"--values-from gives the values of --mode mean|p10|p90; --mode {mode} takes none")
    resolved = find_store(mask, store, f"--mode {mode}" if mode.needs_store and not values_from else None)
    if mode.needs_store and not (resolved or values_from):
        raise HarvestError(f"--mode {mode} needs the store the mask was made from; pass --store")
    site = site_of(resolved, load_config(resolve_model(model)), mask.source.get("site"))
    check_models(mask, model, resolved, allow_other_model)
    if values_from:
        check_values_store(values_from, resolved, mask)
    source = values_from or resolved
    values = mode_values(source, mask, langs, mode) if mode.needs_store else {}
    return Plan(mask, mode, resolved, site, values, build_rows(mask, langs, controls, seed), values_from,
                unit_of(resolved, mask))


def check_values_store(values_from: str, store: str | None, mask) -> None:
    """``--values-from``: a finished store of the mask's shape, harvested on the same model with the same
    tokenizer as ``store`` (else as the mask, when no store is at hand), at the same unit or at the gate
    of the MLP neurons the mask selects. Mixing models or tokenizers is refused, --allow-other-model or not."""
    from analysis.masks import describe_model, model_identity, same_model
    from harvester.store import open_finished

    values = open_finished(values_from)
    if (values.model.layers, values.model.width) != (mask.n_layers, mask.width):
        raise HarvestError(f"--values-from {values_from} has {values.model.layers} x {values.model.width} units, "
                           f"the mask {mask.n_layers} x {mask.width}")
    ref = open_finished(store) if store else None
    origin, what = (model_identity(ref.model.to_dict()), f"store {store}") if ref else (mask.identity(), "the mask")
    mine = model_identity(values.model.to_dict())
    if not origin or same_model(mine, origin) is not True:
        theirs = describe_model(origin) if origin else "no model"
        raise HarvestError(f"--values-from {values_from} was harvested on {describe_model(mine)}, but {what} "
                           f"records {theirs}: values and units must come from one model")
    tokens = [t.sha256 if t else None for t in (values.meta.tokenizer, ref.meta.tokenizer if ref else None)]
    if ref and tokens[0] != tokens[1]:
        raise HarvestError(f"--values-from {values_from} was tokenized otherwise than store {store} "
                           f"(tokenizer sha256 {str(tokens[0])[:12]} vs {str(tokens[1])[:12]})")
    unit, site_unit = values.model.unit or "mlp", (ref.model.unit or "mlp") if ref else "mlp"
    if unit != site_unit and not (unit == "gate" and site_unit == "mlp"):
        raise HarvestError(f"--values-from {values_from} holds --unit {unit} statistics, which cannot be written "
                           f"into --unit {site_unit} units")


def build_rows(mask, langs: list[str], controls: int, seed: int) -> list[Row]:
    """``none``, one row per language, then ``random:{lang}`` controls with the same per-layer counts
    (``random:{lang}:{k}`` when there are several per language)."""
    from analysis.methods import random_control

    if controls < 0:
        raise HarvestError(f"--controls must be 0 or more, got {controls}")
    rows = [Row("none", None)]
    index = [mask.index(lang) for lang in langs]
    rows += [Row(lang, lang, tuple(int(u) for u in mask.selected[k])) for lang, k in zip(langs, index)]
    for c in range(controls):
        drawn = random_control([mask.selected[k] for k in index], mask.n_layers, mask.width, seed + c)
        for lang, sel in zip(langs, drawn):
            name = f"random:{lang}" if controls == 1 else f"random:{lang}:{c + 1}"
            rows.append(Row(name, lang, tuple(int(u) for u in sel)))
    return rows


class ModelWorker:
    """One loaded HF model at a site; the base of the row workers (used directly, or as Ray actors)."""

    def __init__(self, model: str, dtype: str, device: str, site: str, unit: str = "mlp", threads: int | None = None):
        import torch

        from harvester.backends.hf import HFBackend

        if threads:
            torch.set_num_threads(threads)
        self.backend = HFBackend(model, dtype=dtype, device=device, site=site, unit=unit)  # unit: its input or output

    def shape(self) -> tuple[int, int]:
        return self.backend.n_layers, self.backend.width


def check_langs(mask, langs: list[str]) -> None:
    """Every language must be one of the mask's."""
    unknown = [lang for lang in langs if lang not in mask.languages]
    if unknown or not langs:
        raise HarvestError(f"language {', '.join(unknown) or '(none)'} is not in the mask; "
                           f"it has {', '.join(mask.languages)}")


def check_shape(shape: tuple[int, int], mask) -> None:
    layers, width = shape
    if (layers, width) != (mask.n_layers, mask.width):
        raise HarvestError(f"the mask is for {mask.n_layers} layers x {mask.width} units, the model has "
                           f"{layers} x {width}: a mask from another model")


def run_rows(worker_cls, init: tuple, method: str, calls: list[tuple], mask, *, use_ray: bool, device: str,
             dtype: str, actors: int | None, address: str | None, progress: bool, desc: str, shared=None) -> list:
    """``getattr(worker, method)(*call, shared)`` for every call, in order; ``shared`` (large, the same
    for every row) goes once into Ray's object store."""
    from tqdm.auto import tqdm

    from harvester.devices import start_line, wants_ray

    use_ray = use_ray and wants_ray(device, actors, address)
    if progress:
        print(start_line(device, dtype, use_ray), file=sys.stderr)
    bar = tqdm(total=len(calls), unit="row", desc=desc, disable=not progress, file=sys.stderr)
    try:
        if not use_ray:
            worker = worker_cls(*init)
            check_shape(worker.shape(), mask)
            out = []
            for call in calls:
                out.append(getattr(worker, method)(*call, shared))
                bar.update()
            return out
        return _on_ray(worker_cls, init, method, calls, mask, device, actors, address, bar, shared)
    finally:
        bar.close()


def _on_ray(worker_cls, init, method, calls, mask, device, actors, address, bar, shared) -> list:
    import ray

    from harvester.driver import ray_get, ray_init

    started = ray_init(address)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if device.startswith("cuda"):
            n = actors or max(1, int(ray.cluster_resources().get("GPU", 0)))
            options, threads = dict(num_gpus=1, num_cpus=1), None
        else:
            n = actors or 1
            options = dict(num_cpus=max(1, cpus // n))
            threads = options["num_cpus"]
        remote = ray.remote(max_restarts=0, **options)(worker_cls)
        pool = [remote.remote(*init, threads) for _ in range(min(n, len(calls)))]
        check_shape(ray_get(ray, pool[0].shape.remote()), mask)
        shared_ref = ray.put(shared)
        out: list = [None] * len(calls)
        pending: dict = {}
        queue = list(range(len(calls)))
        while queue or pending:
            while queue and pool:
                i, actor = queue.pop(0), pool.pop()
                pending[getattr(actor, method).remote(*calls[i], shared_ref)] = (i, actor)
            (done,), _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(done)
            out[i] = ray_get(ray, done)
            pool.append(actor)
            bar.update()
        return out
    finally:
        if started:
            ray.shutdown()


def intervention_for(row: Row, mode, width: int, values: np.ndarray | None):
    from jobs.interventions import Intervention

    if row.language is None:
        return None
    return Intervention(np.asarray(row.selected, dtype=np.int64), mode, width, values)
