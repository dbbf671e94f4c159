"""Run by tests/test_training_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU accelerator).

DeepSpeed ZeRO-3 with the shipped config (nvlm_d/training/configs/zero3.json, its "auto" entries filled as the
Trainer fills them): the model is built already partitioned (transformers' `from_pretrained` under an active
`HfDeepSpeedConfig` uses `deepspeed.zero.Init`), then trains two steps, each rank on its own example. Writes the
losses, whether every parameter was partitioned at load, and how far the gathered weights moved.
"""

import json
import sys

import deepspeed
import torch
from transformers import AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

from nvlm_d import NVLM_D_Model
from nvlm_d.training import ConversationDataset, DataCollator
from nvlm_d.training.trainer import ZERO3_CONFIG

checkpoint, data, report = sys.argv[1:4]
deepspeed.init_distributed(dist_backend="gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
config = json.loads(ZERO3_CONFIG.read_text())
config.update(
    train_micro_batch_size_per_gpu=1,
    gradient_accumulation_steps=1,
    train_batch_size=world,
    gradient_clipping=1.0,
    bf16={"enabled": False},
    fp16={"enabled": False},
    optimizer={"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}},
)
keep_alive = HfDeepSpeedConfig(config)  # from_pretrained reads it: the model is built partitioned
model = NVLM_D_Model.from_pretrained(checkpoint, dtype=torch.float32)
partitioned = all(hasattr(param, "ds_id") and param.numel() == 0 for param in model.parameters())
with deepspeed.zero.GatheredParameters([model.mlp1[1].weight]):
    before = model.mlp1[1].weight.detach().clone()
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
dataset = ConversationDataset(data, tokenizer, model.config, max_dynamic_patch=1)
batch = DataCollator(tokenizer.pad_token_id)([dataset[rank]])
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
engine.train()
losses = []
for _ in range(2):
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
with deepspeed.zero.GatheredParameters([engine.module.mlp1[1].weight]):
    moved = (engine.module.mlp1[1].weight.detach() - before).abs().max().item()
if rank == 0:
    with open(report, "w") as out:
        json.dump({"losses": losses, "partitioned_at_load": partitioned, "mlp1_moved": moved}, out)
torch.distributed.barrier()
