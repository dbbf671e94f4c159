"""transformers' `Trainer` set up for NVLM-D, and checkpoints that survive `kill -9`.

The Trainer does the training loop, gradient accumulation, evaluation, logging, progress bars, checkpointing and
resuming, and hands distribution to accelerate: DDP under `torchrun`/`accelerate launch`, FSDP2 (`fsdp_config`)
or DeepSpeed (`deepspeed=CONFIG`). This module adds what NVLM-D needs around it:

- the batches are built by `DataCollator` (images, dummy tiles, packing), so the Trainer must not drop columns;
- a checkpoint counts only once every rank has finished writing it: `CheckpointCompleteCallback` writes a marker
  file after a barrier, and `latest_complete_checkpoint` resumes from the newest marked one, so a job killed while
  writing a checkpoint resumes from the previous one instead of failing on a half-written directory.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# Configs that fit NVLM-D, for `TrainingArguments(deepspeed=...)` and `TrainingArguments(fsdp=True, fsdp_config=...)`.
# zero3.json: ZeRO-3 with bf16 when training in bf16; its bucket sizes are transformers' "auto" values for the 72B
# decoder's hidden size 8192 (hidden^2, 0.9 hidden^2, 10 hidden), written out because NVLM_D_Config has no top-level
# hidden_size for "auto" to read; the 16-bit weights are gathered on save. fsdp2.json: FSDP2 with the ViT's and the
# decoder's layers as shard units, full state dicts on save.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ZERO3_CONFIG = CONFIG_DIR / "zero3.json"
FSDP2_CONFIG = CONFIG_DIR / "fsdp2.json"


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint-N` folder of `output_dir` with the highest N that holds the completion marker, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for entry in output_dir.iterdir():
        match = CHECKPOINT_DIR.match(entry.name)
        if match and (entry / COMPLETE_MARKER).is_file():
            steps.append((int(match.group(1)), entry))
    return max(steps)[1] if steps else None


class CheckpointCompleteCallback(TrainerCallback):
    """Marks a checkpoint complete once every process has written its part (weights or shards, optimizer and
    scheduler, its RNG state, the trainer state): a barrier, then the main process writes `COMPLETE_MARKER`
    atomically (written beside, then renamed)."""

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            temporary = folder / (COMPLETE_MARKER + ".tmp")
            temporary.write_text(json.dumps({"global_step": state.global_step, "world_size": args.world_size}))
            os.replace(temporary, folder / COMPLETE_MARKER)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def build_trainer(
    model: torch.nn.Module,
    args: TrainingArguments,
    train_dataset: torch.utils.data.Dataset,
    data_collator: Any,
    eval_dataset: torch.utils.data.Dataset | None = None,
    processing_class: Any = None,
) -> Trainer:
    """A `Trainer` for NVLM-D: every column of the collator's batches kept, `labels` as the label column (so
    evaluation reports a loss), checkpoints marked complete.

    Raises:
        ValueError: `args.save_total_limit` below 2, which could delete the last complete checkpoint while a newer
            one is still being written.
    """
    if args.save_total_limit is not None and args.save_total_limit < 2:
        raise ValueError(
            f"save_total_limit={args.save_total_limit} could leave no complete checkpoint after a crash while "
            "saving; keep at least 2"
        )
    args.remove_unused_columns = False
    args.label_names = ["labels"]
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=processing_class,
        callbacks=[CheckpointCompleteCallback()],
    )
