"""LoRA with peft: adapters that learn, merge into plain weights with the adapters' logits, and checkpoints that
reload — merged ones with and without the package, unmerged InternVL-style ones with their adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_remote_code import run_isolated
from transformers import AutoModel

from nvlm_d import NVLM_D_Model
from nvlm_d.tiny import build_tiny_model
from nvlm_d.training import ConversationDataset, DataCollator, apply_lora, freeze, merge_lora, save_merged
from nvlm_d.training.lora import prepare_for_kbit_training

peft = pytest.importorskip("peft", reason="LoRA needs peft (pip install -e '.[train]')")


@pytest.fixture(scope="module")
def batch(conversations_file, tokenizer, tiny_model):
    dataset = ConversationDataset(conversations_file, tokenizer, tiny_model.config)
    return DataCollator(tokenizer.pad_token_id)([dataset[0]])  # one image: both towers take part


def adapted_model(seed: int = 0, **lora) -> torch.nn.Module:
    model = apply_lora(build_tiny_model(seed).train(), r=4, **lora)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapters change the function, as training would
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def test_lora_trains_adapters_and_the_projector_only_and_the_loss_falls(batch):
    torch.manual_seed(0)
    model = apply_lora(build_tiny_model().train(), r=8)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name or ".mlp1.modules_to_save." in name for name in trainable)
    assert any("language_model" in name for name in trainable) and not any("vision_model" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.3, losses


def test_unfreezing_the_vision_tower_puts_adapters_on_its_layers():
    model = apply_lora(build_tiny_model(), r=4, frozen=())
    adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert any(".vision_model.encoder.layers.0.attn.qkv" in name for name in adapted)
    assert any(".vision_model.encoder.layers.1.mlp.fc2" in name for name in adapted)


def test_merged_weights_give_the_adapters_logits(batch):
    model = adapted_model(frozen=())
    model.eval()
    with torch.no_grad():
        adapter_logits = model(**batch).logits
        merged = merge_lora(model)
        assert type(merged) is NVLM_D_Model
        merged_logits = merged(**batch).logits
    assert (merged_logits - adapter_logits).abs().max() <= 1e-5


def test_a_merged_save_has_the_released_names_and_reloads_exactly(tmp_path, batch, tokenizer):
    merged = merge_lora(adapted_model(frozen=())).eval()
    with torch.no_grad():
        expected = merged(**batch).logits
    save_merged(merged, tmp_path, tokenizer=tokenizer)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert names == set(build_tiny_model().state_dict())
    assert json.loads((tmp_path / "config.json").read_text())["use_llm_lora"] == 0
    for loaded in (
        NVLM_D_Model.from_pretrained(tmp_path, dtype=torch.float32),
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32),
    ):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**batch).logits, expected)
    torch.save({key: value for key, value in batch.items()}, tmp_path / "batch.pt")
    torch.save(expected, tmp_path / "expected.pt")
    # where the package cannot be imported: the saved remote code alone
    run_isolated(
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True, dtype=torch.float32).eval()
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, torch.load({str(tmp_path / "expected.pt")!r}))
        """
    )


def test_an_unmerged_internvl_style_checkpoint_reloads_its_adapters_as_they_were_saved(tmp_path, batch):
    model = build_tiny_model()
    model.wrap_backbone_lora(r=4, lora_alpha=12, lora_dropout=0.1)
    model.wrap_llm_lora(r=4)  # InternVL's default alpha, 256 whatever r is: scaling 64, not 2r / r = 2
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["use_backbone_lora"], config["use_llm_lora"]) == (4, 4)
    reloaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == actual.keys()
    assert any("lora_B" in name for name in actual)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    vision, llm = reloaded.vision_model.peft_config["default"], reloaded.language_model.peft_config["default"]
    assert (vision.r, vision.lora_alpha, vision.lora_dropout) == (4, 12, 0.1)
    assert (llm.r, llm.lora_alpha, llm.lora_dropout) == (4, 256, 0.05)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_internvl_style_adapters_merge_into_a_plain_model(batch):
    model = build_tiny_model()
    model.wrap_llm_lora(r=4, lora_alpha=8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
        expected = model(**batch).logits
        merged = merge_lora(model)
        assert merged.config.use_llm_lora == 0
        assert set(merged.state_dict()) == set(build_tiny_model().state_dict())
        assert (merged(**batch).logits - expected).abs().max() <= 1e-5


def test_bad_lora_and_freeze_settings_are_refused():
    with pytest.raises(ValueError, match="both towers|decoder .* or the vision tower"):
        apply_lora(build_tiny_model(), r=4, frozen=("vision", "llm"))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(build_tiny_model(), r=0)
    with pytest.raises(ValueError, match="unknown parts to freeze"):
        freeze(build_tiny_model(), ["decoder"])
    with pytest.raises(ValueError, match="nothing would train"):
        freeze(build_tiny_model(), ["vision", "mlp1", "llm"])


def test_qlora_preparation_freezes_the_base_and_keeps_its_bf16_weights_in_bf16():
    """peft's k-bit preparation casts every non-4-bit parameter to float32 (34 GiB more for NVLM-D-72B than the
    memory planner counts); the package's keeps them as loaded, frozen, with checkpointing on."""
    model = build_tiny_model().to(torch.bfloat16)
    prepared = prepare_for_kbit_training(model)
    assert {param.dtype for param in prepared.parameters()} == {torch.bfloat16}
    assert not any(param.requires_grad for param in prepared.parameters())
    assert prepared.is_gradient_checkpointing
    adapted = apply_lora(prepared, r=4)
    trained = {name for name, param in adapted.named_parameters() if param.requires_grad}
    assert trained and all("lora_" in name or "modules_to_save" in name for name in trained)
