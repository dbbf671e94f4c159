"""Run by tests/test_training_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU).

DistributedDataParallel over the tiny model, rank 0 training on an image example and rank 1 on a text-only one
(whose batch carries the collator's dummy tile), for two steps. Without the dummy tile, rank 1 would leave the vision
tower out of its graph and DDP would stop ("parameters that were not used in producing loss"). Writes each rank's
losses and a checksum of its weights after the steps (equal on both ranks when the gradients were averaged).
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoTokenizer

from nvlm_d import NVLM_D_Model
from nvlm_d.training import ConversationDataset, DataCollator

checkpoint, data, report = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
model = NVLM_D_Model.from_pretrained(checkpoint, dtype=torch.float32).train()
dataset = ConversationDataset(data, tokenizer, model.config, max_dynamic_patch=1)
batch = DataCollator(tokenizer.pad_token_id)([dataset[rank]])
ddp = DistributedDataParallel(model)
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
losses = []
for _ in range(2):
    loss = ddp(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
checksum = sum(param.double().sum().item() for param in model.parameters())
vision_moved = sum(param.double().abs().sum().item() for param in model.vision_model.parameters())
result = {"losses": losses, "checksum": checksum, "image_flags": batch["image_flags"].tolist(), "vision": vision_moved}
gathered = [None, None]
dist.all_gather_object(gathered, result)
if rank == 0:
    with open(report, "w") as out:
        json.dump(gathered, out)
dist.destroy_process_group()
