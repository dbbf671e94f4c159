"""What `NVLM_D_Model` does for training: no KV cache when learning, InternVL's keywords implemented or refused,
and FSDP2 shard units that exist in the model."""

from __future__ import annotations

import re

import pytest
import torch
from torch.nn import functional as F

from nvlm_d import NVLM_D_Model
from nvlm_d.tiny import build_tiny_model

IDS = torch.tensor([[151644, 8948, 198, 16141, 279, 4755, 13, 151645, 151644, 872, 198, 13048, 151645]])


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return NVLM_D_Model.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def test_training_mode_and_labels_turn_the_kv_cache_off(model):
    with torch.no_grad():
        assert model.train()(input_ids=IDS).past_key_values is None
        assert model.eval()(input_ids=IDS, labels=IDS).past_key_values is None
        assert model.eval()(input_ids=IDS).past_key_values is not None  # inference keeps the config's cache


def test_packed_position_ids_with_a_cache_are_refused(model):
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6]])
    with pytest.raises(ValueError, match="pass use_cache=False"):
        model.eval()(input_ids=IDS, position_ids=positions, use_cache=True)


def test_loss_weight_gives_the_weighted_mean_of_the_token_losses(model):
    labels = IDS.clone()
    labels[0, :4] = -100
    weights = torch.linspace(0.5, 2.0, IDS.shape[1])[None, :]
    with torch.no_grad():
        outputs = model.eval()(input_ids=IDS, labels=labels, loss_weight=weights.tolist())
        # written out: token t predicts label t+1, ignored labels contribute 0, the weights of every shifted position
        # count (InternVL's rule)
        token_losses = F.cross_entropy(outputs.logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")
        expected = (token_losses * weights[0, 1:]).sum() / weights[0, 1:].sum()
        plain = model(input_ids=IDS, labels=labels, loss_weight=(labels != -100).float()).loss
    torch.testing.assert_close(outputs.loss, expected)
    torch.testing.assert_close(plain, model(input_ids=IDS, labels=labels).loss)


def test_internvl_keywords_that_cannot_work_are_refused_not_ignored(model):
    with pytest.raises(ValueError, match="statistics is InternVL's logging"):
        model(input_ids=IDS, statistics=torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="loss_reduction_all_gather"):
        model(input_ids=IDS, labels=IDS, loss_reduction_all_gather=True)
    with pytest.raises(ValueError, match="pass labels too"):
        model(input_ids=IDS, loss_weight=torch.ones_like(IDS))


def test_every_fsdp_plan_rule_names_modules_and_the_vit_layers_are_shard_units():
    model = build_tiny_model()
    names = {re.sub(r"\.\d+(?=\.|$)", ".*", name) for name, _ in model.named_modules()}  # layers.3 -> layers.*
    assert set(model.fsdp_plan) <= names
    assert model.fsdp_plan["vision_model.encoder.layers.*"] == "free_full_weight"
    assert model.fsdp_plan["language_model.model.layers.*"] == "free_full_weight"
