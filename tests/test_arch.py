"""Every supported architecture: its hook point is the activation the statistics are defined on."""

import numpy as np
import pytest
import torch

from harvester.arch import ADAPTERS, ARCHS, mlp_width, resolve_site, site_modules
from harvester.backends.hf import HFBackend, load_config, resolve_model
from harvester.backends.vllm_engine import vllm_site
from harvester.errors import HarvestError
from harvester.stats import StatsSpec
from harvester.tiny import CONFIGS, tiny_model
from harvester.windows import Window


def expected_activation(model, layer):
    """(module whose input to capture, fn(input) -> the activation), written per family from the papers."""
    t = model.config.model_type
    if t == "gpt2":
        mlp = model.transformer.h[layer].mlp
        return mlp, lambda x: mlp.act(mlp.c_fc(x))
    if t == "bloom":
        mlp = model.transformer.h[layer].mlp
        return mlp, lambda x: mlp.gelu_impl(mlp.dense_h_to_4h(x))
    if t == "gpt_neox":
        mlp = model.gpt_neox.layers[layer].mlp
        return mlp, lambda x: mlp.act(mlp.dense_h_to_4h(x))
    if t == "opt":
        block = model.model.decoder.layers[layer]
        return block.fc1, lambda x: block.activation_fn(torch.nn.functional.linear(x, block.fc1.weight, block.fc1.bias))
    if t == "phi3":
        mlp = model.model.layers[layer].mlp
        return mlp, lambda x: mlp.activation_fn(mlp.gate_up_proj(x).chunk(2, dim=-1)[0])
    mlp = model.model.layers[layer].mlp
    return mlp, lambda x: mlp.act_fn(mlp.gate_proj(x))


def test_every_adapter_has_a_tiny_model():
    assert set(CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("arch", sorted(ADAPTERS))
def test_statistics_count_the_documented_activation(arch):
    backend = HFBackend(f"tiny:{arch}")
    model = backend.model
    assert backend.n_layers == model.config.num_hidden_layers
    rng = np.random.default_rng(1)
    windows = [Window(rng.integers(4, 1000, size=n).astype(np.int32), np.full(n, g, dtype=np.int16))
               for n, g in ((17, 0), (9, 1), (17, 1))]
    result = backend.statistics(windows, StatsSpec(("active", "sum")), batch_size=2)
    # reference: each window alone, activation recomputed from the MLP input
    captured, handles = {}, []
    for layer in range(backend.n_layers):
        module, fn = expected_activation(model, layer)
        handles.append(module.register_forward_hook(
            lambda m, inp, out, fn=fn, layer=layer: captured.__setitem__(layer, fn(inp[0]).reshape(-1, backend.width))))
    active = np.zeros((2, backend.n_layers, backend.width), dtype=np.int64)
    with torch.inference_mode():
        for w in windows:
            model(input_ids=torch.from_numpy(w.ids.astype(np.int64))[None])
            for layer in range(backend.n_layers):
                active[w.groups[0], layer] += (captured[layer] > 0).sum(0).numpy()
    for h in handles:
        h.remove()
    assert result[0]["tokens"] == 17 and result[1]["tokens"] == 26
    for g in (0, 1):
        np.testing.assert_array_equal(result[g]["active"], active[g])


def test_user_named_site_module():
    backend = HFBackend("tiny:llama", site="model.layers.{layer}.mlp.up_proj")
    assert backend.n_layers == 3 and backend.width == 128


def test_shared_module_is_refused():
    model = torch.nn.Module()
    shared = torch.nn.ReLU()
    model.layers = torch.nn.ModuleList([torch.nn.Sequential(shared), torch.nn.Sequential(shared)])
    with pytest.raises(HarvestError, match="shared between layers"):
        site_modules(model, "layers.{layer}.0")


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_record_is_complete_and_its_tiny_model_has_every_path(name):
    """One record per architecture: every field a module path with ``{layer}`` is filled in where the
    architecture has the module, and the tiny model built from the record's config has a module at every
    path, for every layer, of the shapes the statistics, ``--unit gate`` and LoRA assume."""
    record = ARCHS[name]
    assert record.name == name and record.tiny
    required = {"act", "block", "mlp", "up_proj", "down_proj"}
    assert required <= set(record.paths())
    assert record.gate_proj is None or record.gated
    assert not record.lora or record.attention, "LoRA needs its attention targets too"
    model = tiny_model(name)
    assert model.config.model_type == name
    found = dict(model.named_modules(remove_duplicate=False))
    width = mlp_width(model.config)
    for layer in range(model.config.num_hidden_layers):
        for field, path in record.paths().items():
            assert "{layer}" in path, (name, field)
            assert path.format(layer=layer) in found, (name, field, path.format(layer=layer))
        if record.gate_proj:
            assert found[record.gate_proj.format(layer=layer)].out_features == width
        if record.lora:
            for path in record.lora_inputs:
                linear = found[path.format(layer=layer)]
                assert isinstance(linear, torch.nn.Linear) and linear.out_features == width, path
            down = found[record.down_proj.format(layer=layer)]
            assert isinstance(down, torch.nn.Linear) and down.in_features == width
    assert [resolve_site(model.config, None, u) for u in ("mlp", "residual")] == [record.act, record.block]
    assert record.vllm_site.endswith((".act_fn", ".act", ".gelu_impl", ".activation_fn"))


def test_the_views_of_the_registry_agree_with_it():
    assert ADAPTERS is ARCHS and CONFIGS == {name: a.tiny for name, a in ARCHS.items()}
    lora = sorted(name for name, a in ARCHS.items() if a.lora)
    assert lora == ["bloom", "cohere", "gemma", "gemma2", "gpt_neox", "llama", "mistral", "opt", "qwen2", "qwen3"]
    assert vllm_site(load_config(resolve_model("tiny:phi3")), None, "mlp") == "model.layers.{layer}.mlp.act_fn"
    assert vllm_site(load_config(resolve_model("tiny:llama")), None, "gate") == "model.layers.{layer}.mlp.act_fn"
    for name in ("phi3", "gpt2"):
        with pytest.raises(HarvestError, match="--unit gate needs a gate projection"):
            resolve_site(load_config(resolve_model(f"tiny:{name}")), None, "gate")
