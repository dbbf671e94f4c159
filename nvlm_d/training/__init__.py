"""Fine-tuning NVLM-D: training examples from JSONL conversations, batches (padding, packing, dummy tiles),
LoRA/QLoRA with peft, and transformers' Trainer with checkpoints that survive kill -9.

`finetune.py` puts these together into a run, which `nvlm-d finetune` calls; docs/finetuning.md describes the
data format, the commands for one GPU to several machines, and the memory each recipe needs. peft (LoRA) and
DeepSpeed are optional: in a clone of the repository, `pip install -e ".[train]"` or `-e ".[deepspeed]"` (the
package is not on PyPI).
"""

from .collator import DataCollator, PackedDataset, pack_lengths
from .data import IGNORE_INDEX, ConversationDataset, RecordError
from .lora import apply_lora, freeze, merge_lora, save_merged
from .trainer import CheckpointCompleteCallback, build_trainer, latest_complete_checkpoint

__all__ = [
    "IGNORE_INDEX",
    "CheckpointCompleteCallback",
    "ConversationDataset",
    "DataCollator",
    "PackedDataset",
    "RecordError",
    "apply_lora",
    "build_trainer",
    "freeze",
    "latest_complete_checkpoint",
    "merge_lora",
    "pack_lengths",
    "save_merged",
]
