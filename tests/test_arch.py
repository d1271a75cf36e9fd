"""Every supported architecture: its hook point is the activation the statistics are defined on."""

import numpy as np
import pytest
import torch

from harvester.arch import ADAPTERS, site_modules
from harvester.backends.hf import HFBackend
from harvester.errors import HarvestError
from harvester.stats import StatsSpec
from harvester.tiny import CONFIGS
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
