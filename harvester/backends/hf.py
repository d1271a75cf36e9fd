"""Hugging Face transformers backend: any causal LM from a local path, a hub id or ``tiny:ARCH``."""

from __future__ import annotations

import contextlib
import hashlib
from functools import partial
from pathlib import Path

import numpy as np
import torch

from harvester import arch
from harvester.backends.base import Backend
from harvester.errors import HarvestError
from harvester.stats import BATCHWISE, NeuronStats, StatsSpec
from harvester.windows import Window, batches

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLE = 1 << 20


def quiet_transformers() -> None:
    """Our own progress bar and errors replace transformers' loading bars and warnings."""
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()


def resolve_model(spec: str) -> str:
    """``tiny:ARCH`` -> its cached directory; a path -> checked to exist; anything else is a hub id."""
    quiet_transformers()
    if spec.startswith("tiny:"):
        from harvester.tiny import tiny_path

        return str(tiny_path(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise HarvestError(f"model directory {path} has no config.json")
        return str(path.resolve())
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise HarvestError(f"model path not found: {spec}")
    return spec


def load_config(path: str):
    from transformers import AutoConfig

    return _load("model config", AutoConfig.from_pretrained, path)


def load_tokenizer(path: str, config=None):
    """The tokenizer at ``path``, checked against the model's embedding (``config``, or the config at
    ``path``): a token id the embedding has no row for would end a harvest with an IndexError."""
    from transformers import AutoTokenizer

    tokenizer = _load("tokenizer", AutoTokenizer.from_pretrained, path)
    if config is None and Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        return tokenizer  # a tokenizer's own directory: no model to check it against
    check_vocab(config if config is not None else load_config(path), tokenizer, path)
    return tokenizer


def check_vocab(config, tokenizer, path: str) -> None:
    """Refuse a tokenizer that makes ids beyond the model's embedding (``vocab_size`` rows)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    if isinstance(rows, int) and rows > 0 and len(tokenizer) > rows:
        raise HarvestError(f"the tokenizer of '{path}' has {len(tokenizer)} tokens but the model's embedding has "
                           f"{rows} rows (vocab_size): ids {rows} and above cannot be embedded; use the "
                           "model's own tokenizer, or resize its embedding")


def _load(what: str, loader, path: str):
    """``loader(path)``, with a failure (no such hub id, no network, bad files) as one clear line."""
    try:
        return loader(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HarvestError(f"could not load {what} '{path}': {first}") from None


def max_positions(config, seq_len: int | None = None) -> int | None:
    """The longest sequence the model's positions allow (None: no fixed limit, e.g. ALiBi); a
    ``seq_len`` beyond it is refused."""
    limit = next((v for v in (getattr(config, n, None) for n in ("max_position_embeddings", "n_positions"))
                  if isinstance(v, int) and v > 0), None)
    if seq_len is not None and limit is not None and seq_len > limit:
        raise HarvestError(f"--seq-len {seq_len} exceeds the model's maximum of {limit} positions")
    return limit


def model_identity(spec: str, path: str, config) -> dict:
    """What names a model, as a store's fingerprint records it: ``id`` (``--model`` as given), the hub
    ``revision`` and the ``weights`` hash (:func:`weights_fingerprint`); ``weights_sampled`` is the
    older, sampled hash that masks made before the full one still carry."""
    return {"id": spec, "revision": getattr(config, "_commit_hash", None), "weights": weights_fingerprint(path),
            "weights_sampled": sampled_weights_fingerprint(path)}


WEIGHTS_SCHEME = "sha256-full:"
"""The prefix of :func:`weights_fingerprint`'s hashes (the older sampled ones have none)."""


def _weight_files(path: str) -> list[Path] | None:
    root = Path(path)
    if not root.is_dir():
        return None
    files = sorted(p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    return files or None  # a directory without weight files (TF, Flax only) names nothing


def weights_fingerprint(path: str) -> str | None:
    """``sha256-full:`` + sha256 over each weight file's name and whole content; None for hub ids and
    directories without weight files. Every byte counts: a model whose MLPs alone were fine-tuned
    (and merged) is another model. Each file's hash is cached under ``$LSN_CACHE`` by its real path,
    size and modification time, so a large model is read once."""
    files = _weight_files(path)
    if files is None:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{_file_sha256(file)}\n".encode())
    return WEIGHTS_SCHEME + digest.hexdigest()


def _file_sha256(file: Path) -> str:
    import json
    import os

    from harvester.tiny import cache_dir

    stat = file.stat()
    key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = cache_dir() / "weights-sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        with file.open("rb") as f:
            known[key] = hashlib.file_digest(f, "sha256").hexdigest()
        try:  # a cache only: a race or a read-only home loses nothing but time
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache)
        except OSError:
            pass
    return known[key]


def sampled_weights_fingerprint(path: str) -> str | None:
    """The older hash: sha256 over each weight file's name, size, first and last MiB (kept to compare
    with masks and stores that recorded it)."""
    files = _weight_files(path)
    if files is None:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            digest.update(f.read(_SAMPLE))
            if size > _SAMPLE:
                f.seek(max(size - _SAMPLE, _SAMPLE))
                digest.update(f.read())
    return digest.hexdigest()


@contextlib.contextmanager
def _hooks(modules, fn, inputs: bool = False):
    """Forward hooks calling ``fn(layer, output)`` (``inputs``: pre-hooks calling ``fn(layer, input)``,
    the module's first positional input); always removed."""
    if inputs:
        handles = [m.register_forward_pre_hook(partial(_call_input, fn, layer)) for layer, m in enumerate(modules)]
    else:
        handles = [m.register_forward_hook(partial(_call, fn, layer)) for layer, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _call(fn, layer, module, inputs, output):
    fn(layer, output[0] if isinstance(output, tuple) else output)  # decoder blocks may return tuples


def _call_input(fn, layer, module, inputs):
    fn(layer, inputs[0])  # [batch, seq, neurons]: what down_proj multiplies


class _Pooling:
    """One sample per document segment (a run of one group in a row): its ``last`` token, or the ``mean``."""

    def __init__(self, mode: str):
        self.mode = mode

    def begin(self, groups: np.ndarray) -> torch.Tensor:
        """Find the segments of a batch ``groups [B, S]``; returns each segment's group id."""
        B, S = groups.shape
        seg_groups, starts, ends = [], [], []
        for row in range(B):
            g = groups[row]
            cuts = np.flatnonzero(np.diff(g)) + 1
            for start, end in zip(np.r_[0, cuts], np.r_[cuts, S]):
                if g[start] >= 0:
                    seg_groups.append(int(g[start]))
                    starts.append(row * S + int(start))
                    ends.append(row * S + int(end))
        self.n_tokens = B * S
        self.starts, self.ends = starts, ends
        self._on: dict = {}
        return torch.tensor(seg_groups, dtype=torch.long)

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        x = act.detach().reshape(-1, act.shape[-1])
        if self.mode == "last":
            if x.device not in self._on:
                self._on[x.device] = torch.tensor([e - 1 for e in self.ends], device=x.device)
            return x.index_select(0, self._on[x.device])
        if x.device not in self._on:
            weights = torch.zeros((len(self.starts), self.n_tokens), dtype=torch.float32)
            for k, (a, b) in enumerate(zip(self.starts, self.ends)):
                weights[k, a:b] = 1.0 / (b - a)
            self._on[x.device] = weights.to(x.device)
        return self._on[x.device] @ x.float()


_FUSED_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "ReLU": "relu", "PytorchGELUTanh": "gelu_tanh",
                      "GELUTanh": "gelu_tanh"}
"""transformers' activation modules -> the fused kernel's activation."""


@contextlib.contextmanager
def _fused_mlps(plan: list[tuple], stats: NeuronStats, spec: StatsSpec, device):
    """Each planned MLP's forward replaced by ``down(fused(gate(x), up(x)))``, which also adds the
    layer's statistics of ``act(gate(x))``; always restored."""
    from harvester.fused import fused_gated

    edges = torch.tensor(spec.hist_edges, dtype=torch.float32, device=device) if "hist" in spec.stats else None

    def make(layer: int, mlp, activation: str):
        def forward(x):
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            width = gate.shape[-1]
            out, part = fused_gated(gate.reshape(-1, width), up.reshape(-1, width), stats.positions(gate.device),
                                    stats.n_present, activation, edges)
            stats.add_fused(layer, part)
            return mlp.down_proj(out.reshape(gate.shape))
        return forward

    saved = [vars(mlp).get("forward") for mlp, _ in plan]  # accelerate's device hooks live there
    for layer, (mlp, activation) in enumerate(plan):
        mlp.forward = make(layer, mlp, activation)
    try:
        yield
    finally:
        for (mlp, _), forward in zip(plan, saved):
            if forward is None:
                del mlp.forward
            else:
                mlp.forward = forward


def fused_agrees(ref: dict, got: dict, float32: bool) -> bool:
    """Whether the fused kernel's statistics ``got`` match the hook path's ``ref`` (``{group:
    {"tokens", "active", "act_sum"}}``, arrays ``[layer, neuron]``) of the same windows.

    Both paths feed the first layer the same input, so its counts must be equal and its sums within
    rounding. In float32 every layer must match so. In bfloat16 and float16 the kernel rounds
    ``act(gate)`` and ``act(gate) * up`` as the model does, but its float32 ``exp`` may differ from
    PyTorch's by an ulp, which next to a rounding tie changes a rounded value (about 0.02% of SiLU
    products in float16, 0.3 to 0.4% of tanh-GELU products; none of SiLU's in bfloat16, on Triton's
    interpreter); from the second layer on the inputs may then differ by rounding and a gate near 0
    change sign: at most 2% of all (token, neuron) cells of the layers may differ there."""
    tolerance = 1e-3 if float32 else 2e-2
    checked = slice(None) if float32 else slice(0, 1)
    for g in ref:
        scale = np.abs(ref[g]["act_sum"][checked]).max()
        if not np.array_equal(got[g]["active"][checked], ref[g]["active"][checked]) or \
                np.abs(got[g]["act_sum"][checked] - ref[g]["act_sum"][checked]).max() > tolerance * scale:
            return False
        differing = np.abs(got[g]["active"].astype(np.int64) - ref[g]["active"]).sum()
        if differing > 0.02 * ref[g]["tokens"] * ref[g]["active"].size:
            return False
    return True


class HFBackend(Backend):
    """A transformers causal LM with a forward hook on each layer's activation module."""

    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu",
                 device_map: str | None = None, site: str | None = None, unit: str = "mlp",
                 fused: bool | None = None):
        """``fused``: use the fused Triton kernel (:mod:`harvester.fused`) in place of each gated MLP's
        activation; ``None`` (default) uses it on CUDA when the MLP and activation are supported and
        ``LSN_FUSED`` is not ``0``, ``True`` demands it (an error when unsupported), ``False`` never.
        ``device`` and ``dtype`` as :func:`harvester.devices.resolve` takes them (``auto`` too), checked on this
        machine; the defaults are fixed, not ``auto``, so that the class computes the same on every machine
        (the commands default to ``auto``)."""
        from transformers import AutoModelForCausalLM

        from harvester.devices import resolve_here

        device, dtype = resolve_here(device, dtype)
        self.path = resolve_model(model)
        config = load_config(self.path)
        self.site = arch.resolve_site(config, site, unit)
        self.inputs = arch.reads_input(unit)  # down-input: the hooked module's input, by a pre-hook
        kwargs = {"dtype": DTYPES[dtype]}
        if device_map:
            kwargs["device_map"] = device_map
        self.model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs).eval()
        if not device_map:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.body = self.model.base_model  # the LM head's logits are not needed
        self.modules = arch.site_modules(self.model, self.site)
        self.n_layers = len(self.modules)
        self.pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
        self.width = self._probe_width()
        self.fused = self._fused_plan(fused, site is None and unit == "mlp")
        if self.fused is not None:
            self._check_fused()

    def _check_fused(self) -> None:
        """On this device, the kernel must give the hook path's statistics on a small batch
        (:func:`fused_agrees`), or the backend refuses to start (``LSN_FUSED=0`` turns the kernel off)."""
        rng = np.random.default_rng(0)
        windows = [Window(rng.integers(3, 100, 24).astype(np.int32), np.repeat(np.int16([0, 1]), 12)) for _ in range(2)]
        spec = StatsSpec(("active", "sum"))
        plan, self.fused = self.fused, None
        try:
            ref = self.statistics(windows, spec, 2)
            self.fused = plan
            got = self.statistics(windows, spec, 2)
        except Exception as err:  # noqa: BLE001 -- any failure of the kernel is reported the same way
            raise HarvestError(f"the fused statistics kernel failed on {self.device} ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); set LSN_FUSED=0") from None
        if not fused_agrees(ref, got, next(self.model.parameters()).dtype == torch.float32):
            raise HarvestError(f"the fused statistics kernel disagrees with the hook path on {self.device}; "
                               "set LSN_FUSED=0")

    def _fused_plan(self, wanted: bool | None, default_site: bool) -> list[tuple] | None:
        """``[(mlp module, activation name)]`` per layer when the fused kernel is used, else None."""
        import os

        if wanted is False or (wanted is None and (self.device.type != "cuda" or os.environ.get("LSN_FUSED") == "0")):
            return None
        plan = []
        for act in self.modules if default_site else []:
            mlp = next((m for m in self.model.modules() if getattr(m, "act_fn", None) is act), None)
            name = _FUSED_ACTIVATIONS.get(type(act).__name__)
            if mlp is None or name is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
                plan = None
                break
            plan.append((mlp, name))
        if not plan:
            if wanted:
                raise HarvestError("the fused kernel needs a gated MLP (gate_proj, up_proj, down_proj, act_fn) with "
                                   f"SiLU, ReLU or tanh-GELU at the default site; {self.site} is not one")
            return None
        return plan

    def _probe_width(self) -> int:
        """Neurons per layer, read off one two-token forward pass; every layer must fire once."""
        widths: dict[int, list[int]] = {}
        with _hooks(self.modules, lambda layer, out: widths.setdefault(layer, []).append(out.shape[-1]), self.inputs):
            probe = 1 if self.pad_id != 1 else 2  # not the pad id: some models warn about unmasked padding
            self.forward(np.full((1, 2), probe, dtype=np.int64), np.ones((1, 2), dtype=np.int64))
        if sorted(widths) != list(range(self.n_layers)) or any(len(w) != 1 for w in widths.values()):
            raise HarvestError(f"the modules '{self.site}' did not each fire once per forward pass")
        if len({w[0] for w in widths.values()}) != 1:
            raise HarvestError(f"the modules '{self.site}' differ in width between layers")
        return widths[0][0]

    @torch.inference_mode()
    def forward(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """One forward pass of the model body; no attention mask when nothing is padded."""
        ids_t = torch.from_numpy(ids).to(self.device)
        mask_t = None if mask.all() else torch.from_numpy(mask).to(self.device)
        self.body(input_ids=ids_t, attention_mask=mask_t, use_cache=False)

    def statistics(self, windows: list[Window], spec: StatsSpec, batch_size: int,
                   pooling: str = "token") -> dict[int, dict[str, np.ndarray]]:
        stats = NeuronStats(spec, self.n_layers, self.width, device=self.device)
        # the fused kernel counts no nonzero, no batch-wise statistic and no histogram on per-neuron ranges:
        # those take the hook path
        if (self.fused is not None and pooling == "token" and "nonzero" not in spec.stats
                and not set(spec.stats) & set(BATCHWISE) and spec.hist_bins is None):
            with _fused_mlps(self.fused, stats, spec, self.device):
                for ids, mask, groups in batches(windows, batch_size, self.pad_id):
                    stats.begin(torch.from_numpy(groups))
                    self.forward(ids, mask)
            return stats.result()
        pool = _Pooling(pooling) if pooling != "token" else None
        update = stats.update if pool is None else (lambda layer, out: stats.update(layer, pool(out)))
        with _hooks(self.modules, update, self.inputs):
            for ids, mask, groups in batches(windows, batch_size, self.pad_id):
                stats.begin(torch.from_numpy(groups) if pool is None else pool.begin(groups))
                self.forward(ids, mask)
        return stats.result()
