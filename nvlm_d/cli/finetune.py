"""`nvlm-d finetune`: fine-tune NVLM-D on JSONL conversations with transformers' Trainer.

One process: `nvlm-d finetune --model M --data D --output O [...]`. Several GPUs or machines: the same command under
`torchrun --nproc-per-node 8 -m nvlm_d.cli finetune ...` (or `accelerate launch`), with `--deepspeed` or `--fsdp` to
shard the model. Checkpoints go to OUTPUT/checkpoint-N; running the same command again resumes from the newest
complete one (also after kill -9), and does nothing (and says so) once the run has finished. The result is a plain
NVLM-D model directory in OUTPUT (LoRA adapters merged; the adapter alone in OUTPUT/adapter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from .common import CLIError, model_option, one_line, positive_int, say

PARTS = ("vision", "mlp1", "llm")
# Written in --output once the model is saved: the step it is from and the length asked for (see `training_done`).
RUN_RECORD = "finetune_run.json"


def _parts(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()] if text != "none" else []
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}: choose from {', '.join(PARTS)} (or none)")
    return parts


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune on JSONL conversations (LoRA, QLoRA or full; one GPU to many machines)",
        description=(
            "Fine-tune NVLM-D with transformers' Trainer on InternVL/LLaVA-style JSONL records ({'image': path or "
            "[paths], 'conversations': [{'from': 'human', 'value': '<image>\\n...'}, {'from': 'gpt', 'value': "
            "'...'}]}); the loss covers the answers only. Launch it as is on one device, or under torchrun / "
            "accelerate launch on many. Running it again with the same --output resumes from the newest complete "
            "checkpoint. See docs/finetuning.md."
        ),
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="the NVLM-D model directory (or Hub id)")
    parser.add_argument("--data", required=True, metavar="JSONL", help="training records, one JSON object a line")
    parser.add_argument("--output", required=True, metavar="DIR", help="checkpoints and the fine-tuned model")
    parser.add_argument("--eval-data", metavar="JSONL", help="records to report the evaluation loss on")
    parser.add_argument("--image-folder", metavar="DIR", help="where image paths start (default: each file's folder)")
    parser.add_argument(
        "--lora", type=positive_int, metavar="R", help="train LoRA adapters of rank R (alpha 2R) instead of all weights"
    )
    parser.add_argument(
        "--qlora", action="store_true", help="with --lora: load the decoder in 4-bit NF4 (bitsandbytes, CUDA)"
    )
    parser.add_argument(
        "--freeze",
        type=_parts,
        default=["vision"],
        metavar="PARTS",
        help="comma-separated parts not to train: vision, mlp1, llm, or none (default: vision)",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_float, default=1.0, metavar="N", help="passes over the data")
    length.add_argument("--max-steps", type=positive_int, metavar="N", help="optimizer steps (instead of --epochs)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="examples per device a step")
    parser.add_argument("--grad-accum", type=positive_int, default=1, metavar="N", help="micro-batches per step")
    parser.add_argument(
        "--lr", type=_positive_float, metavar="RATE", help="peak learning rate (default: 1e-4 with LoRA, else 1e-5)"
    )
    parser.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="linear warm-up steps (default: 0)")
    parser.add_argument(
        "--max-length",
        type=positive_int,
        default=8192,
        metavar="TOKENS",
        help="longest example, image tokens included; longer ones are left out with a warning (default: 8192)",
    )
    parser.add_argument("--max-tiles", type=positive_int, metavar="N", help="tiles per image (default: the config's)")
    parser.add_argument("--pack", action="store_true", help="pack several examples into rows of --max-length tokens")
    parser.add_argument(
        "--bad-records",
        choices=("error", "skip"),
        default="error",
        help="a bad record stops with an error naming its line (default), or is skipped and counted",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    shard = parser.add_mutually_exclusive_group()
    shard.add_argument(
        "--deepspeed",
        nargs="?",
        const="zero3",
        metavar="CONFIG",
        help="DeepSpeed with this JSON config (no value: the shipped ZeRO-3 config)",
    )
    shard.add_argument(
        "--fsdp",
        nargs="?",
        const="fsdp2",
        metavar="CONFIG",
        help="FSDP2 with this fsdp_config JSON (no value: the shipped one, ViT and decoder layers as units)",
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp32"), help="training precision (default: bf16 on GPUs, fp32 on the CPU)"
    )
    parser.add_argument("--save-steps", type=positive_int, default=500, metavar="N", help="checkpoint every N steps")
    parser.add_argument(
        "--save-total-limit", type=positive_int, default=2, metavar="N", help="checkpoints kept (>= 2; default: 2)"
    )
    parser.add_argument("--eval-steps", type=positive_int, metavar="N", help="evaluate every N steps (default: save)")
    parser.add_argument("--logging-steps", type=positive_int, default=10, metavar="N", help="log every N steps")
    parser.add_argument("--seed", type=int, default=42, help="seed for weights of new adapters, shuffling, dropout")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="data-loading processes (default: 2)")
    parser.add_argument("--no-merge", action="store_true", help="with --lora: save the adapter only, do not merge")
    parser.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> None:
    if args.qlora and not args.lora:
        raise CLIError("--qlora trains LoRA adapters on a 4-bit decoder: give --lora R too")
    if args.qlora and (args.deepspeed is not None or args.fsdp is not None):
        raise CLIError("--qlora is not sharded: run it on one GPU, or one copy per GPU with plain torchrun (DDP)")
    if args.lora and set(args.freeze) >= {"vision", "llm"}:
        raise CLIError("--lora needs the decoder or the vision tower unfrozen (see --freeze)")
    if not args.lora and set(args.freeze) == set(PARTS):
        raise CLIError("--freeze vision,mlp1,llm leaves nothing to train")
    if args.save_total_limit < 2:
        raise CLIError("--save-total-limit must be at least 2, so that a crash while saving keeps a checkpoint")
    for name in ("data", "eval_data"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise CLIError(f"--{name.replace('_', '-')} {path}: no such file")
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")


def _sharding_config(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..training.trainer import FSDP2_CONFIG, ZERO3_CONFIG

    if args.deepspeed is not None:
        config = ZERO3_CONFIG if args.deepspeed == "zero3" else Path(args.deepspeed)
        if not config.is_file():
            raise CLIError(f"--deepspeed {args.deepspeed}: no such file")
        if not torch.cuda.is_available():
            raise CLIError("--deepspeed needs CUDA GPUs (accelerate runs DeepSpeed on GPUs only); here use --fsdp")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise CLIError(
                "--deepspeed needs DeepSpeed: pip install deepspeed (or pip install -e '.[deepspeed]' in the clone)"
            ) from None
        return {"deepspeed": str(config)}
    if args.fsdp is not None:
        config = FSDP2_CONFIG if args.fsdp == "fsdp2" else Path(args.fsdp)
        if not config.is_file():
            raise CLIError(f"--fsdp {args.fsdp}: no such file")
        return {"fsdp": True, "fsdp_config": str(config)}
    return {}


def training_arguments(args: argparse.Namespace, cuda: bool, bf16: bool) -> Any:
    """TrainingArguments from the command line. Made before the model is loaded, so that DeepSpeed ZeRO-3 builds
    the model already partitioned (transformers reads the active DeepSpeed config in `from_pretrained`)."""
    from transformers import TrainingArguments

    lr = args.lr if args.lr is not None else (1e-4 if args.lora else 1e-5)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by torchrun or accelerate launch
    evaluate = args.eval_data is not None
    return TrainingArguments(
        output_dir=args.output,
        num_train_epochs=args.epochs if args.max_steps is None else 1,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=lr,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=bf16 and cuda,
        use_cpu=not cuda,
        ddp_backend="gloo" if launched and not cuda else None,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(args.eval_steps or args.save_steps) if evaluate else None,
        logging_steps=args.logging_steps,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=args.workers,
        report_to="none",
        ddp_find_unused_parameters=False,
        **_sharding_config(args),
    )


def load_model(path: str, args: argparse.Namespace, dtype: Any) -> Any:
    """The package's NVLM_D_Model (not a directory's remote code, which may be an older version) in `dtype`,
    4-bit on the decoder for QLoRA."""
    import torch

    from ..modeling_nvlm_d import NVLM_D_Model

    kwargs: dict[str, Any] = {"dtype": dtype}
    if args.qlora:
        if not torch.cuda.is_available():
            raise CLIError("--qlora needs a CUDA GPU (bitsandbytes 4-bit)")
        from ..quantization import bitsandbytes_config

        kwargs["quantization_config"] = bitsandbytes_config(4)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        return NVLM_D_Model.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise CLIError(f"cannot load the model from {path}: {one_line(exc)}") from None


def prepare_model(model: Any, args: argparse.Namespace) -> Any:
    """Frozen parts, then LoRA (or QLoRA) adapters when asked for."""
    from ..training import lora

    if not args.lora:
        lora.freeze(model, args.freeze)
        return model
    if args.qlora:
        model = lora.prepare_for_kbit_training(model, args.gradient_checkpointing)
    return lora.apply_lora(model, args.lora, frozen=args.freeze)


def build_datasets(args: argparse.Namespace, tokenizer: Any, config: Any) -> tuple[Any, Any]:
    from ..training.collator import PackedDataset
    from ..training.data import ConversationDataset, RecordError

    datasets = []
    for path in (args.data, args.eval_data):
        if path is None:
            datasets.append(None)
            continue
        try:
            dataset = ConversationDataset(
                path,
                tokenizer,
                config,
                max_length=args.max_length,
                bad_records=args.bad_records,
                image_folder=args.image_folder,
                max_dynamic_patch=args.max_tiles,
            )
        except (RecordError, ValueError, FileNotFoundError) as exc:
            raise CLIError(str(exc)) from None
        if dataset.skipped:
            say(f"{path}: {len(dataset)} examples, left out: {dict(dataset.skipped)}")
        datasets.append(PackedDataset(dataset, args.max_length) if args.pack else dataset)
    return datasets[0], datasets[1]


def merge_adapter(model_path: str, adapter_dir: Path, output_dir: Path, dtype: Any, tokenizer: Any) -> None:
    """Load the base weights again in `dtype` (not 4-bit, for QLoRA), apply the trained adapter, merge it and save
    a plain model directory with the tokenizer and processor."""
    import peft
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ..modeling_nvlm_d import NVLM_D_Model
    from ..processing_nvlm_d import NVLM_D_Processor
    from ..training.lora import save_merged

    unset_hf_deepspeed_config()  # a plain, whole model in this process
    base = NVLM_D_Model.from_pretrained(model_path, dtype=dtype)
    adapted = peft.PeftModel.from_pretrained(base, adapter_dir)
    processor = NVLM_D_Processor.from_model_config(base.config, tokenizer)
    save_merged(adapted, output_dir, tokenizer=tokenizer, processor=processor)


def check_output(output: str, model_path: str) -> None:
    """Refuse an --output that is the model directory, lies inside it or holds it: the fine-tuned weights would
    overwrite the base model's, and checkpoint rotation deletes `checkpoint-N` folders of --output (the base model,
    if it is one of them)."""
    model = Path(model_path).expanduser()
    if not model.is_dir():  # a Hub id: its files live in the Hub cache
        return
    out = Path(output).expanduser()
    named = (Path(os.path.abspath(out)), Path(os.path.abspath(model)))
    for out_dir, model_dir in (named, (out.resolve(), model.resolve())):  # as named, then with links followed
        if out_dir == model_dir:
            problem = "is the model directory"
        elif model_dir in out_dir.parents:
            problem = f"is inside the model directory {model}"
        elif out_dir in model_dir.parents:
            problem = f"holds the model directory {model}"
        else:
            continue
        raise CLIError(
            f"--output {output} {problem}: the fine-tuned model would be written over (or beside) the base model's "
            "files. Choose a folder of its own"
        )


def run_record(args: argparse.Namespace, global_step: int, mean_loss: float | None) -> dict[str, Any]:
    return {
        "global_step": global_step,
        "max_steps": args.max_steps,
        "epochs": args.epochs if args.max_steps is None else None,
        "mean_loss_of_last_run": mean_loss,
    }


def write_run_record(output: Path, record: dict[str, Any]) -> None:
    """`RUN_RECORD` in `output`, written beside and renamed: it says which step the model in `output` is from."""
    temporary = output / (RUN_RECORD + ".tmp")
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, output / RUN_RECORD)


def training_done(output: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]] | None:
    """When training in `output` is over for this command's --max-steps or --epochs (running it again would only
    train past its end): the newest complete checkpoint and the run's record, which is empty when the model of that
    step was never written (the run stopped while saving it). Else None.

    transformers' Trainer, resumed from the checkpoint of the last step, runs one more step when that step does not
    end an epoch; so whether anything is left to train is decided here, from the newest complete checkpoint.
    """
    from ..training.trainer import latest_complete_checkpoint

    latest = latest_complete_checkpoint(output)
    if latest is None:
        return None
    step = int(latest.name.removeprefix("checkpoint-"))
    record_path = output / RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if args.max_steps is not None:
        done = step >= args.max_steps
    else:  # the steps of N epochs depend on the data, the batch and the world size: the record knows them
        done = record.get("global_step") == step and record.get("epochs") == args.epochs
    if not done:
        return None
    return latest, record if record.get("global_step") == step else {}


def export_checkpoint(checkpoint: Path, args: argparse.Namespace, model_path: str, dtype: Any, tokenizer: Any) -> None:
    """Write the model of a finished run from its last checkpoint, as the end of a run does: the adapter (merged
    unless --no-merge) with LoRA, else the whole model, with the tokenizer and processor."""
    from ..modeling_nvlm_d import NVLM_D_Model
    from ..processing_nvlm_d import NVLM_D_Processor

    output = Path(args.output)
    if args.lora:
        adapter = output / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        for file in checkpoint.glob("adapter_*"):
            shutil.copy2(file, adapter / file.name)
        if not args.no_merge:
            merge_adapter(model_path, adapter, output, dtype, tokenizer)
        return
    model = NVLM_D_Model.from_pretrained(checkpoint, dtype=dtype)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    NVLM_D_Processor.from_model_config(model.config, tokenizer).save_pretrained(output)


def _summary(steps_before: int, global_step: int, mean_loss: float) -> str:
    if global_step == steps_before:
        return f"no steps left to train (step {global_step} was the last)"
    if steps_before:
        return f"trained steps {steps_before + 1}-{global_step}, mean training loss of these steps {mean_loss:.4f}"
    return f"trained {global_step} steps, mean training loss {mean_loss:.4f}"


def run(args: argparse.Namespace) -> int:
    _check(args)
    source = model_option(args.model)
    check_output(args.output, source.path)
    output = Path(args.output)
    done = training_done(output, args)
    if done is not None and done[1]:
        length = f"--max-steps {args.max_steps}" if args.max_steps is not None else f"--epochs {args.epochs:g}"
        say(
            f"{output} already holds this finished run: {done[1]['global_step']} steps ({length}); nothing to do. "
            "Raise --max-steps (or --epochs) to train further, or choose a new --output to start over"
        )
        return 0
    if source.local_files_only:  # a cached Hub model and no Hub: every load in this run reads the cache only
        from huggingface_hub import constants

        os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from here
        constants.HF_HUB_OFFLINE = True  # read once, at import, by huggingface_hub and transformers
    model_path = source.path
    import torch
    from transformers import AutoTokenizer, set_seed
    from transformers.utils import logging as hf_logging

    from ..configuration_nvlm_d import NVLM_D_Config
    from ..processing_nvlm_d import NVLM_D_Processor
    from ..training.collator import DataCollator
    from ..training.data import RecordError
    from ..training.trainer import build_trainer, latest_complete_checkpoint

    hf_logging.set_verbosity_warning()
    cuda = torch.cuda.is_available()
    bf16 = (args.dtype or ("bf16" if cuda else "fp32")) == "bf16"
    # LoRA keeps the frozen base in bf16; full fine-tuning keeps float32 master weights and computes in bf16.
    load_dtype = torch.bfloat16 if bf16 and args.lora else torch.float32
    if done is not None:  # trained to the end, but stopped while writing the model: write it, do not train
        checkpoint = done[0]
        if int(os.environ.get("RANK", "0")) == 0:
            say(f"training ended at {checkpoint}, but its model was not written: writing it now")
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            export_checkpoint(checkpoint, args, model_path, load_dtype, tokenizer)
            step = int(checkpoint.name.removeprefix("checkpoint-"))
            write_run_record(output, run_record(args, step, None))
            say(f"model of step {step} in {output}" + (f", adapter in {output / 'adapter'}" if args.lora else ""))
        return 0
    # The data is checked first: a bad record is reported in seconds, not after minutes of loading the model.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = NVLM_D_Config.from_pretrained(model_path)
    train_dataset, eval_dataset = build_datasets(args, tokenizer, config)
    set_seed(args.seed)  # before the adapters are created: their initial weights come from this seed
    training_args = training_arguments(args, cuda, bf16)
    model = prepare_model(load_model(model_path, args, load_dtype), args)
    trainer = build_trainer(
        model,
        training_args,
        train_dataset,
        DataCollator(tokenizer.pad_token_id, config.force_image_size),
        eval_dataset=eval_dataset,
    )
    resume = latest_complete_checkpoint(output)
    if resume is not None and trainer.is_world_process_zero():
        say(f"resuming from {resume}")
    steps_before = int(resume.name.removeprefix("checkpoint-")) if resume is not None else 0
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except RecordError as exc:  # an image that changed after the up-front check; from a worker, named again
        raise CLIError(exc.record_message()) from None
    if args.lora:
        trainer.save_model(str(output / "adapter"))
    else:
        trainer.save_model(str(output))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        if args.lora and not args.no_merge:
            merge_adapter(model_path, output / "adapter", output, load_dtype, tokenizer)
        elif not args.lora:
            tokenizer.save_pretrained(output)
            NVLM_D_Processor.from_model_config(trainer.model.config, tokenizer).save_pretrained(output)
        trained = result.global_step > steps_before
        write_run_record(output, run_record(args, result.global_step, result.training_loss if trained else None))
        say(
            f"{_summary(steps_before, result.global_step, result.training_loss)}; model in {output}"
            + (f", adapter in {output / 'adapter'}" if args.lora else "")
        )
    trainer.accelerator.wait_for_everyone()
    return 0
