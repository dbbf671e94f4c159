"""InternViT as NVLM-D stores it: when the dummy attention heads are skipped (only where that is exact, under
`torch.compile` too, never behind a module's hooks), stochastic depth, InternVL's activation-checkpointing switch,
and construction on the meta device.

The oracle is the tower written out here in float64 from the reference's formulas, every padded head computed."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from accelerate import init_empty_weights
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from nvlm_d.configuration_nvlm_d import NVLM_D_Config
from nvlm_d.modeling_intern_vit import DropPath, InternVisionModel
from nvlm_d.modeling_nvlm_d import NVLM_D_Model
from nvlm_d.tiny import build_tiny_model, tiny_config, zero_dummy_heads_

RTOL = 1e-4
NUM_LAYERS = 2  # the tiny tower's depth


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, variance_width: int) -> torch.Tensor:
    variance = x[..., :variance_width].pow(2).mean(-1, keepdim=True)
    return weight * (x / torch.sqrt(variance + eps))


def reference_tower(params: dict[str, torch.Tensor], config, pixel_values: torch.Tensor) -> torch.Tensor:
    """InternViT's last hidden state from the reference's formulas: patch embedding, class token and positions;
    then per layer x + ls1 * attention(rms(x)) and x + ls2 * fc2(gelu(fc1(rms(x)))). The attention computes every
    padded head; its QK-RMSNorm takes the variance over the real channels only."""
    eps, width, head_dim = config.layer_norm_eps, config.hidden_size, config.head_dim
    heads = config.num_attention_heads + config.num_dummy_heads
    patch = params["embeddings.patch_embedding.weight"]
    x = F.conv2d(pixel_values.to(patch.dtype), patch, params["embeddings.patch_embedding.bias"], stride=patch.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([params["embeddings.class_embedding"].expand(len(x), 1, -1), x], dim=1)
    x = x + params["embeddings.position_embedding"]
    for index in range(config.num_hidden_layers):
        prefix = f"encoder.layers.{index}."
        w = {name[len(prefix) :]: tensor for name, tensor in params.items() if name.startswith(prefix)}
        qkv = F.linear(rms_norm(x, w["norm1.weight"], eps, width), w["attn.qkv.weight"], w.get("attn.qkv.bias"))
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = rms_norm(q, w["attn.q_norm.weight"], eps, width), rms_norm(k, w["attn.k_norm.weight"], eps, width)
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax((q * head_dim**-0.5) @ k.transpose(-1, -2), dim=-1)
        merged = (weights @ v).transpose(1, 2).flatten(2)
        x = x + w["ls1"] * F.linear(merged, w["attn.proj.weight"], w["attn.proj.bias"])
        hidden = F.gelu(F.linear(rms_norm(x, w["norm2.weight"], eps, width), w["mlp.fc1.weight"], w["mlp.fc1.bias"]))
        x = x + w["ls2"] * F.linear(hidden, w["mlp.fc2.weight"], w["mlp.fc2.bias"])
    return x


def float64_params(vision: InternVisionModel, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().requires_grad_(requires_grad) for name, p in vision.named_parameters()}


def oracle(vision: InternVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    return reference_tower(float64_params(vision), vision.config, pixel_values)


def features(vision: InternVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vision(pixel_values).last_hidden_state


def decisions(vision: InternVisionModel) -> list[bool]:
    return [layer.attn.dummy_heads_silent for layer in vision.encoder.layers]


def dummy_rows(attn, block: int) -> slice:
    """The dummy heads' rows of the q (0), k (1) or v (2) block of `qkv`."""
    real = attn.num_real_heads * attn.head_dim
    return slice(block * attn.padded_dim + real, (block + 1) * attn.padded_dim)


def silent_tower(seed: int = 5) -> InternVisionModel:
    """A tiny tower in eval mode whose dummy heads are zero, as in the released checkpoint."""
    return zero_dummy_heads_(build_tiny_model(seed)).vision_model


def silent_by_values_tower(seed: int = 5) -> InternVisionModel:
    """A tiny tower in eval mode whose dummy heads are silent by their value rows alone: their `proj` columns are
    live, so in training the value rows get a non-zero gradient through them."""
    vision = build_tiny_model(seed).vision_model
    with torch.no_grad():
        for layer in vision.encoder.layers:
            layer.attn.qkv.weight[dummy_rows(layer.attn, 2)] = 0
    return vision.eval()


def write_live_dummy_weights_(vision: InternVisionModel, seed: int = 0) -> None:
    """Bring every dummy head to life through `param.data`, as loaders and user code write weights."""
    generator = torch.Generator().manual_seed(seed)
    for layer in vision.encoder.layers:
        attn, real = layer.attn, layer.attn.embed_dim
        for block in range(3):
            rows = attn.qkv.weight.data[dummy_rows(attn, block)]
            rows.copy_(0.05 * torch.randn(rows.shape, generator=generator))
        attn.q_norm.weight.data[real:] = 1.0
        attn.k_norm.weight.data[real:] = 1.0
        columns = attn.proj.weight.data[:, real:]
        columns.copy_(0.05 * torch.randn(columns.shape, generator=generator))


def gradients(vision: InternVisionModel, pixel_values: torch.Tensor) -> tuple[dict, dict]:
    """Our gradients of a loss over the last hidden state, and the oracle's for the same parameters."""
    vision.zero_grad()
    vision(pixel_values).last_hidden_state.square().mean().backward()
    ours = {name: p.grad for name, p in vision.named_parameters() if p.requires_grad}
    params = float64_params(vision, requires_grad=True)
    reference_tower(params, vision.config, pixel_values).square().mean().backward()
    return ours, {name: params[name].grad for name in ours}


def forward_flops(vision: InternVisionModel, pixel_values: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        vision(pixel_values)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------------
# Which dummy heads are silent
# ----------------------------------------------------------------------------------------------------------------
def test_zeroed_dummy_heads_are_detected_as_silent_in_every_layer():
    assert silent_tower().detect_silent_dummy_heads() == NUM_LAYERS


def test_random_dummy_heads_are_not_silent():
    assert build_tiny_model(seed=5).vision_model.detect_silent_dummy_heads() == 0


@pytest.mark.parametrize(
    "zeroed, silent",
    [
        ("value rows and their bias", True),
        ("proj columns", True),
        ("value rows of some heads, proj columns of the others", True),
        ("value rows but not their bias", False),
    ],
)
def test_a_dummy_head_is_silent_when_its_values_or_its_output_columns_are_zero(pixel_values, zeroed, silent):
    vision = build_tiny_model(seed=5, vision_config={"qkv_bias": True}).vision_model
    with torch.no_grad():
        for layer in vision.encoder.layers:
            attn, real, head = layer.attn, layer.attn.embed_dim, layer.attn.head_dim
            values, value_bias = attn.qkv.weight[dummy_rows(attn, 2)], attn.qkv.bias[dummy_rows(attn, 2)]
            columns = attn.proj.weight
            if zeroed.startswith("value rows of some heads"):
                values[: 3 * head] = value_bias[: 3 * head] = 0  # dummy heads 0-2 by their values, 3-6 by columns
                columns[:, real + 3 * head :] = 0
            elif zeroed.startswith("value rows"):
                values.zero_()
                if zeroed == "value rows and their bias":
                    value_bias.zero_()
            else:
                columns[:, real:] = 0
    assert vision.detect_silent_dummy_heads() == (NUM_LAYERS if silent else 0)
    assert relative_error(features(vision, pixel_values), oracle(vision, pixel_values)) < RTOL


# ----------------------------------------------------------------------------------------------------------------
# When it is decided
# ----------------------------------------------------------------------------------------------------------------
def test_from_pretrained_decides_once_the_weights_are_loaded(tmp_path):
    zero_dummy_heads_(build_tiny_model(seed=5)).save_pretrained(tmp_path)
    loaded = NVLM_D_Model.from_pretrained(tmp_path)
    assert decisions(loaded.vision_model) == [True] * NUM_LAYERS


@pytest.mark.parametrize("decide_again", ["model.eval()", "vision_model.detect_silent_dummy_heads()"])
def test_live_weights_written_through_param_data_are_computed_once_decided_again(pixel_values, decide_again):
    model = zero_dummy_heads_(build_tiny_model(seed=5))
    assert decisions(model.vision_model) == [True] * NUM_LAYERS
    write_live_dummy_weights_(model.vision_model)
    if decide_again == "model.eval()":
        model.eval()
    else:
        model.vision_model.detect_silent_dummy_heads()
    assert decisions(model.vision_model) == [False] * NUM_LAYERS
    assert relative_error(features(model.vision_model, pixel_values), oracle(model.vision_model, pixel_values)) < RTOL


def test_loading_a_state_dict_with_live_dummy_heads_turns_skipping_off(pixel_values):
    model, live = zero_dummy_heads_(build_tiny_model(seed=5)), build_tiny_model(seed=6)
    model.load_state_dict(live.state_dict())
    assert decisions(model.vision_model) == [False] * NUM_LAYERS
    assert relative_error(features(model.vision_model, pixel_values), oracle(live.vision_model, pixel_values)) < RTOL


def test_loading_a_state_dict_with_silent_dummy_heads_turns_skipping_on():
    model = build_tiny_model(seed=6)
    model.load_state_dict(zero_dummy_heads_(build_tiny_model(seed=5)).state_dict())
    assert decisions(model.vision_model) == [True] * NUM_LAYERS


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_trainable_weights_get_exact_gradients_through_every_head(pixel_values, mode):
    vision = silent_by_values_tower()
    assert decisions(vision) == [True] * NUM_LAYERS
    vision.train(mode == "train")
    ours, expected = gradients(vision, pixel_values[:1])
    assert ours["encoder.layers.0.attn.qkv.weight"][dummy_rows(vision.encoder.layers[0].attn, 2)].any()
    for name, grad in expected.items():
        assert relative_error(ours[name], grad) < RTOL, name


def test_weights_written_during_training_are_used_at_once(pixel_values):
    vision = silent_tower().train()
    write_live_dummy_weights_(vision)
    assert relative_error(features(vision, pixel_values), oracle(vision, pixel_values)) < RTOL


def test_training_steps_never_read_a_tensor_back_to_the_host(pixel_values):
    vision = silent_tower().train()
    optimizer = torch.optim.SGD(vision.parameters(), lr=0.1)

    def step():
        vision(pixel_values[:1]).last_hidden_state.square().mean().backward()

    step()
    optimizer.step()  # every weight changes, as in each training step
    optimizer.zero_grad()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    operators = {event.key for event in profile.key_averages()}
    assert not operators & {"aten::item", "aten::is_nonzero", "aten::_local_scalar_dense"}


def test_a_frozen_attention_skips_silent_dummy_heads_in_training_with_exact_gradients(pixel_values):
    vision = silent_by_values_tower().train()
    trainable_flops = forward_flops(vision, pixel_values[:1])
    for layer in vision.encoder.layers:
        layer.attn.qkv.requires_grad_(False)
        layer.attn.proj.requires_grad_(False)
    assert forward_flops(vision, pixel_values[:1]) < trainable_flops
    ours, expected = gradients(vision, pixel_values[:1])
    for name, grad in expected.items():
        assert relative_error(ours[name], grad) < RTOL, name


# ----------------------------------------------------------------------------------------------------------------
# torch.compile, hooks and wrappers, weights that are not really here
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_compiled_tower_follows_the_per_layer_decision(pixel_values):
    vision = build_tiny_model(seed=5).vision_model  # live dummy heads: what is skipped changes the features
    compiled = torch.compile(vision, backend="inductor")
    tile = pixel_values[:1]
    with torch.no_grad():
        every_head = compiled(tile).last_hidden_state
        for layer in vision.encoder.layers:
            layer.attn.dummy_heads_silent = True  # claimed, not true of these weights: only the decision differs
        real_heads_eager = vision(tile).last_hidden_state
        real_heads_compiled = compiled(tile).last_hidden_state
    assert relative_error(every_head, oracle(vision, tile)) < RTOL
    assert relative_error(real_heads_compiled, real_heads_eager) < 1e-5
    assert relative_error(real_heads_compiled, every_head) > 10 * RTOL  # the decision was acted on


def test_hooks_on_qkv_and_proj_see_every_call(pixel_values):
    vision = silent_tower()
    calls = []
    for layer in vision.encoder.layers:
        for module in (layer.attn.qkv, layer.attn.proj):
            module.register_forward_hook(lambda module, args, output: calls.append(module))
    actual = features(vision, pixel_values)
    assert len(calls) == 2 * NUM_LAYERS
    assert relative_error(actual, oracle(vision, pixel_values)) < RTOL


def test_lora_on_qkv_and_proj_reaches_the_dummy_heads_and_its_merge_is_computed(pixel_values):
    peft = pytest.importorskip("peft")
    vision = silent_tower()
    config = peft.LoraConfig(r=4, target_modules=["qkv", "proj"], init_lora_weights=False)  # random A and B
    adapted = peft.get_peft_model(vision, config)
    with torch.no_grad():
        adapted_features = adapted(pixel_values).last_hidden_state
    merged = adapted.merge_and_unload()
    assert decisions(merged) == [False] * NUM_LAYERS  # merged weights: nothing is known until decided again
    expected = oracle(merged, pixel_values)
    assert relative_error(adapted_features, expected) < RTOL
    assert relative_error(features(merged, pixel_values), expected) < RTOL
    assert merged.detect_silent_dummy_heads() == 0


def test_an_offloaded_tower_is_never_read_and_computes_every_head(pixel_values):
    from accelerate import cpu_offload

    vision = silent_tower()
    expected = oracle(vision, pixel_values)
    cpu_offload(vision, execution_device=torch.device("cpu"))
    assert vision.encoder.layers[0].attn.qkv.weight.device.type == "meta"
    assert vision.detect_silent_dummy_heads() == 0
    assert relative_error(features(vision, pixel_values), expected) < RTOL


def test_a_partitioned_weight_is_never_read():
    vision = silent_tower()
    qkv = vision.encoder.layers[0].attn.qkv
    qkv.weight.data = torch.empty(0)  # what DeepSpeed ZeRO-3 leaves in place of a partitioned parameter
    assert vision.detect_silent_dummy_heads() == NUM_LAYERS - 1
    assert decisions(vision) == [False] + [True] * (NUM_LAYERS - 1)


# ----------------------------------------------------------------------------------------------------------------
# Construction on the meta device
# ----------------------------------------------------------------------------------------------------------------
META_CONSTRUCTION = """
import json, torch
from nvlm_d.configuration_nvlm_d import NVLM_D_Config
from nvlm_d.modeling_intern_vit import InternVisionModel
from nvlm_d.modeling_nvlm_d import NVLM_D_Model
from nvlm_d.tiny import tiny_config

with torch.device("meta"):
    tiny = NVLM_D_Model(tiny_config(vision_config={"drop_path_rate": 0.1}))
    vision_72b = InternVisionModel(NVLM_D_Config().vision_config)
vision_72b.eval()  # deciding about the dummy heads reads nothing on the meta device
print(json.dumps({
    "tiny": {name: list(p.shape) for name, p in tiny.named_parameters()},
    "vision_72b": {name: list(p.shape) for name, p in vision_72b.named_parameters()},
    "devices": sorted({p.device.type for p in [*tiny.parameters(), *vision_72b.parameters()]}),
    "decisions": [layer.attn.dummy_heads_silent for layer in vision_72b.encoder.layers],
}))
"""


def test_the_model_and_the_72b_vision_tower_build_under_the_meta_device_context():
    """In a fresh process: once transformers' `from_pretrained` has run, `torch.linspace` escapes the meta
    context for the rest of the process (its meta-init patch is cached by torch), which would hide the bug."""
    result = subprocess.run(
        [sys.executable, "-c", META_CONSTRUCTION], capture_output=True, text=True, timeout=1800, check=False
    )
    assert result.returncode == 0, result.stderr
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built["devices"] == ["meta"]
    assert built["tiny"] == {name: list(p.shape) for name, p in NVLM_D_Model(tiny_config()).named_parameters()}
    with init_empty_weights():  # accelerate's way: parameters on meta, everything else as usual
        expected_72b = InternVisionModel(NVLM_D_Config().vision_config)
    assert built["vision_72b"] == {name: list(p.shape) for name, p in expected_72b.named_parameters()}
    assert built["vision_72b"]["encoder.layers.44.attn.qkv.weight"] == [3 * 4096, 3200]
    assert built["decisions"] == [False] * 45


# ----------------------------------------------------------------------------------------------------------------
# Stochastic depth
# ----------------------------------------------------------------------------------------------------------------
def test_drop_path_drops_whole_samples_at_its_rate_and_rescales_the_kept_ones():
    samples, rate = 20_000, 0.3
    torch.manual_seed(0)
    out = DropPath(rate).train()(torch.ones(samples, 5, 4)).flatten(1)
    assert torch.equal(out.amin(dim=1), out.amax(dim=1))  # each sample is kept or dropped as a whole
    kept = out[:, 0] != 0
    torch.testing.assert_close(out[kept, 0], torch.full((int(kept.sum()),), 1 / (1 - rate)))
    dropped_fraction = 1 - kept.double().mean().item()
    assert abs(dropped_fraction - rate) < 5 * (rate * (1 - rate) / samples) ** 0.5


def test_drop_path_is_the_identity_in_eval_mode(pixel_values):
    vision = build_tiny_model(seed=5, vision_config={"drop_path_rate": 0.5}).vision_model  # in eval mode
    assert isinstance(vision.encoder.layers[-1].drop_path1, DropPath)
    assert relative_error(features(vision, pixel_values), oracle(vision, pixel_values)) < RTOL


def test_a_layer_at_drop_rate_one_passes_its_input_through_in_training(pixel_values):
    vision = build_tiny_model(seed=5, vision_config={"drop_path_rate": 1.0}).vision_model.train()
    first_layer_in, first_layer_out, last_layer_out = vision(pixel_values[:1], output_hidden_states=True).hidden_states
    assert torch.equal(last_layer_out, first_layer_out)  # the last layer's rate is 1.0
    assert not torch.equal(first_layer_out, first_layer_in)  # the first layer's rate is 0


def test_drop_path_rates_grow_linearly_from_zero_over_the_layers():
    config = tiny_config(vision_config={"drop_path_rate": 0.1, "num_hidden_layers": 5}).vision_config
    layers = InternVisionModel(config).encoder.layers
    rates = [getattr(layer.drop_path1, "drop_prob", 0.0) for layer in layers]
    assert rates == torch.linspace(0, 0.1, 5).tolist()
    assert [getattr(layer.drop_path2, "drop_prob", 0.0) for layer in layers] == rates


# ----------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("switch", ["vision_model", "vision_model.encoder"])
def test_internvl_checkpointing_switch_recomputes_layers_in_backward_with_the_same_gradients(pixel_values, switch):
    model = build_tiny_model(seed=5, vision_config={"drop_path_rate": 0.5}).train()  # recomputation replays drops
    vision, mlp_calls = model.vision_model, []
    for layer in vision.encoder.layers:
        layer.mlp.register_forward_hook(lambda module, args, output: mlp_calls.append(module))

    def calls_and_gradients() -> tuple[int, dict[str, torch.Tensor]]:
        mlp_calls.clear()
        vision.zero_grad()
        torch.manual_seed(0)
        vision(pixel_values).last_hidden_state.square().mean().backward()
        return len(mlp_calls), {name: p.grad.clone() for name, p in vision.named_parameters()}

    plain_calls, plain = calls_and_gradients()
    model.get_submodule(switch).gradient_checkpointing = True
    checkpointed_calls, checkpointed = calls_and_gradients()
    assert (plain_calls, checkpointed_calls) == (NUM_LAYERS, 2 * NUM_LAYERS)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_activation_checkpointing_enable_shows_in_internvl_switch():
    model = build_tiny_model(seed=0)
    model.activation_checkpointing_enable()
    assert model.vision_model.gradient_checkpointing and model.vision_model.encoder.gradient_checkpointing
    model.activation_checkpointing_disable()
    assert not model.vision_model.gradient_checkpointing and not model.vision_model.encoder.gradient_checkpointing


def test_internvl_switch_set_after_disabling_checkpointing_passes_use_reentrant(pixel_values):
    model = build_tiny_model(seed=0).train()
    model.activation_checkpointing_enable()
    model.activation_checkpointing_disable()  # leaves transformers' bare `checkpoint` on every layer
    model.vision_model.encoder.gradient_checkpointing = True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*use_reentrant.*")
        model.vision_model(pixel_values[:1]).last_hidden_state.square().mean().backward()


# ----------------------------------------------------------------------------------------------------------------
# Inference overwrites only its own intermediates
# ----------------------------------------------------------------------------------------------------------------
def test_inference_leaves_the_outputs_that_forward_hooks_keep_untouched(pixel_values):
    """Inference writes GELU and layer-scale results in place; outputs a hook holds on to must keep their values."""
    vision = silent_tower()
    layer = vision.encoder.layers[0]
    kept = {}
    for name, module in (("fc1", layer.mlp.fc1), ("fc2", layer.mlp.fc2), ("proj", layer.attn.proj)):
        module.register_forward_hook(lambda _, args, output, name=name: kept.update({name: (output.clone(), output)}))
    expected = oracle(vision, pixel_values)
    actual = features(vision, pixel_values)
    for name, (copy, output) in kept.items():
        assert torch.equal(output, copy), f"{name}'s output was overwritten"
    assert relative_error(actual, expected) < RTOL
