"""Run by tests/test_training_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU).

Each rank loads the tiny checkpoint sharded by transformers' native FSDP2 (`distributed_config`, which shards by
`model.fsdp_plan`: ViT layers, projector, decoder layers), computes the loss of its half of a batch and backpropagates;
rank 0 then compares the full gradients with those of one unsharded process on the mean of both halves' losses.
Writes a JSON report to the path given second.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoTokenizer, DistributedConfig

from nvlm_d import NVLM_D_Model
from nvlm_d.training import ConversationDataset, DataCollator

checkpoint, data, report = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
model = NVLM_D_Model.from_pretrained(
    checkpoint, dtype=torch.float32, distributed_config=DistributedConfig(fsdp_size=2)
).train()
rank, world = dist.get_rank(), dist.get_world_size()
dataset = ConversationDataset(data, tokenizer, model.config, max_dynamic_patch=1)
collate = DataCollator(tokenizer.pad_token_id)
halves = [collate([dataset[0]]), collate([dataset[1]])]  # an image example and a text-only one

model(**halves[rank]).loss.backward()
sharded = {}
for name, param in model.named_parameters():
    full = param.grad.full_tensor() if param.grad is not None else None
    sharded[name] = full

if rank == 0:
    reference = NVLM_D_Model.from_pretrained(checkpoint, dtype=torch.float32).train()
    loss = sum(reference(**half).loss for half in halves) / world
    loss.backward()
    worst = 0.0
    missing = []
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])).item()
    for name, param in reference.named_parameters():
        if sharded.get(name) is None:
            missing.append(name)
            continue
        worst = max(worst, (sharded[name] - param.grad).abs().max().item() / (param.grad.abs().max().item() + 1e-12))
    sharded_layers = [
        name for name, module in model.named_modules() if type(module).__name__.startswith("FSDP") and name
    ]
    with open(report, "w") as out:
        result = {"max_relative_difference": worst, "missing": missing, "gradient_norm": norm}
        json.dump({**result, "sharded_modules": sharded_layers}, out)
dist.barrier()
dist.destroy_process_group()
