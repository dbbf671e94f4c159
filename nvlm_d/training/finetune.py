"""A fine-tuning run: the data, the model (frozen parts, LoRA or QLoRA adapters), transformers' Trainer with its
sharding (DDP, FSDP2 or DeepSpeed, chosen by the launcher and `FinetuneOptions`), resuming, and the finished model.

`finetune(FinetuneOptions(...))` is what `nvlm-d finetune` runs, in one process or in each process that torchrun,
accelerate launch or the deepspeed launcher starts. A run writes checkpoints to OUTPUT/checkpoint-N and resumes
from the newest complete one when started again (also after kill -9); at its end OUTPUT holds a plain NVLM-D model
directory (LoRA adapters merged; the adapter alone in OUTPUT/adapter) and `RUN_RECORD`, which says from which step
that model is. Started again once finished, a run trains nothing: it says so, or writes the model from the last
checkpoint when the run stopped while writing it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..messages import one_line
from .lora import PARTS

logger = logging.get_logger(__name__)

# Written in the output folder once the model is saved: the step it is from and the length asked for (see
# `training_done`).
RUN_RECORD = "finetune_run.json"
BAD_RECORDS = ("error", "skip")
DTYPES = ("bf16", "fp32")


class FinetuneError(ValueError):
    """Options that cannot run, or data, a model or an environment they cannot run on. The message is one line
    that names the option (as `nvlm-d finetune` spells it) or the file at fault."""


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """One fine-tuning run; the fields are `nvlm-d finetune`'s options (docs/finetuning.md describes them).

    `model` is a model directory or a Hub id that `from_pretrained` can load as it is. `lora`: the adapters' rank
    (alpha 2R), None for full fine-tuning; `qlora` loads the decoder in 4-bit NF4 under them. `freeze`: the parts
    (`PARTS`) not to train. The length is `max_steps` optimizer steps when given, else `epochs` passes over the
    data. `lr` None: 1e-4 with LoRA, else 1e-5. `deepspeed`: a JSON config, or "zero3" for the shipped ZeRO-3 one;
    `fsdp`: an fsdp_config JSON, or "fsdp2" for the shipped one. `dtype` None: bf16 on GPUs, fp32 on the CPU.
    `no_merge`: with LoRA, save the adapter only. Checked when made: a combination that cannot run raises
    FinetuneError.
    """

    model: str
    data: str
    output: str
    eval_data: str | None = None
    image_folder: str | None = None
    lora: int | None = None
    qlora: bool = False
    freeze: tuple[str, ...] = ("vision",)
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float | None = None
    warmup_steps: int = 0
    max_length: int = 8192
    max_tiles: int | None = None
    pack: bool = False
    bad_records: str = "error"
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    fsdp: str | None = None
    dtype: str | None = None
    save_steps: int = 500
    save_total_limit: int = 2
    eval_steps: int | None = None
    logging_steps: int = 10
    seed: int = 42
    workers: int = 2
    no_merge: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "freeze", tuple(self.freeze))
        _check_values(self)
        _check_combination(self)


def _check_values(options: FinetuneOptions) -> None:
    """What `nvlm-d finetune`'s argument parser checks, for callers that build options themselves."""
    if unknown := sorted(set(options.freeze) - set(PARTS)):
        raise FinetuneError(f"--freeze: unknown parts {unknown}: choose from {', '.join(PARTS)}")
    if options.bad_records not in BAD_RECORDS:
        raise FinetuneError(f"--bad-records must be one of {BAD_RECORDS}, got {options.bad_records!r}")
    if options.dtype not in (None, *DTYPES):
        raise FinetuneError(f"--dtype must be one of {DTYPES} or None, got {options.dtype!r}")
    if options.deepspeed is not None and options.fsdp is not None:
        raise FinetuneError("--deepspeed and --fsdp are two ways to shard: choose one")
    if not (options.epochs > 0 and math.isfinite(options.epochs)):
        raise FinetuneError(f"--epochs must be a number > 0, got {options.epochs!r}")
    if options.lr is not None and not (options.lr > 0 and math.isfinite(options.lr)):
        raise FinetuneError(f"--lr must be a number > 0, got {options.lr!r}")
    for name in ("lora", "max_steps", "max_tiles", "eval_steps"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(options, name)}")
    for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
        if getattr(options, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(options, name)}")


def _check_combination(options: FinetuneOptions) -> None:
    if options.qlora and not options.lora:
        raise FinetuneError("--qlora trains LoRA adapters on a 4-bit decoder: give --lora R too")
    if options.qlora and (options.deepspeed is not None or options.fsdp is not None):
        raise FinetuneError("--qlora is not sharded: run it on one GPU, or one copy per GPU with plain torchrun (DDP)")
    if options.lora and set(options.freeze) >= {"vision", "llm"}:
        raise FinetuneError("--lora needs the decoder or the vision tower unfrozen (see --freeze)")
    if not options.lora and set(options.freeze) == set(PARTS):
        raise FinetuneError("--freeze vision,mlp1,llm leaves nothing to train")
    if options.save_total_limit < 2:
        raise FinetuneError("--save-total-limit must be at least 2, so that a crash while saving keeps a checkpoint")
    for name in ("data", "eval_data"):
        path = getattr(options, name)
        if path is not None and not Path(path).is_file():
            raise FinetuneError(f"--{name.replace('_', '-')} {path}: no such file")
    if options.workers < 0:
        raise FinetuneError(f"--workers must be >= 0, got {options.workers}")


class Outcome(enum.Enum):
    """What a call of `finetune` did."""

    TRAINED = "trained"  # trained (possibly zero steps, when resumed at the end) and wrote the model
    ALREADY_FINISHED = "already finished"  # the output holds this finished run's model: nothing done
    EXPORTED = "exported"  # trained to the end before, but its model was not written: wrote it from the checkpoint


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """The outcome of `finetune` in this process. `main_process`: whether this process is the one that wrote the
    model (rank 0). `steps_before`: the step resumed from. `mean_loss`: the Trainer's mean training loss over the
    steps of this call (None when nothing was trained). `adapter`: where the LoRA adapter is, None without LoRA."""

    outcome: Outcome
    output: Path
    global_step: int
    main_process: bool
    steps_before: int = 0
    mean_loss: float | None = None
    adapter: Path | None = None


def _sharding_config(options: FinetuneOptions) -> dict[str, Any]:
    import torch

    from .trainer import FSDP2_CONFIG, ZERO3_CONFIG

    if options.deepspeed is not None:
        config = ZERO3_CONFIG if options.deepspeed == "zero3" else Path(options.deepspeed)
        if not config.is_file():
            raise FinetuneError(f"--deepspeed {options.deepspeed}: no such file")
        if not torch.cuda.is_available():
            raise FinetuneError("--deepspeed needs CUDA GPUs (accelerate runs DeepSpeed on GPUs only); here use --fsdp")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise FinetuneError(
                "--deepspeed needs DeepSpeed: pip install deepspeed (or pip install -e '.[deepspeed]' in the clone)"
            ) from None
        return {"deepspeed": str(config)}
    if options.fsdp is not None:
        config = FSDP2_CONFIG if options.fsdp == "fsdp2" else Path(options.fsdp)
        if not config.is_file():
            raise FinetuneError(f"--fsdp {options.fsdp}: no such file")
        return {"fsdp": True, "fsdp_config": str(config)}
    return {}


def training_arguments(options: FinetuneOptions, cuda: bool, bf16: bool) -> Any:
    """TrainingArguments of a run. Made before the model is loaded, so that DeepSpeed ZeRO-3 builds the model
    already partitioned (transformers reads the active DeepSpeed config in `from_pretrained`)."""
    from transformers import TrainingArguments

    lr = options.lr if options.lr is not None else (1e-4 if options.lora else 1e-5)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by torchrun or accelerate launch
    evaluate = options.eval_data is not None
    return TrainingArguments(
        output_dir=options.output,
        num_train_epochs=options.epochs if options.max_steps is None else 1,
        max_steps=options.max_steps or -1,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=lr,
        warmup_steps=options.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=bf16 and cuda,
        use_cpu=not cuda,
        ddp_backend="gloo" if launched and not cuda else None,
        activation_checkpointing=options.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if options.gradient_checkpointing else None,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(options.eval_steps or options.save_steps) if evaluate else None,
        logging_steps=options.logging_steps,
        seed=options.seed,
        data_seed=options.seed,
        dataloader_num_workers=options.workers,
        report_to="none",
        ddp_find_unused_parameters=False,
        **_sharding_config(options),
    )


def load_model(path: str, options: FinetuneOptions, dtype: Any) -> Any:
    """The package's NVLM_D_Model (not a directory's remote code, which may be an older version) in `dtype`,
    4-bit on the decoder for QLoRA."""
    import torch

    from ..modeling_nvlm_d import NVLM_D_Model

    kwargs: dict[str, Any] = {"dtype": dtype}
    if options.qlora:
        if not torch.cuda.is_available():
            raise FinetuneError("--qlora needs a CUDA GPU (bitsandbytes 4-bit)")
        from ..quantization import bitsandbytes_config

        kwargs["quantization_config"] = bitsandbytes_config(4)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        return NVLM_D_Model.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise FinetuneError(f"cannot load the model from {path}: {one_line(exc)}") from None


def prepare_model(model: Any, options: FinetuneOptions) -> Any:
    """Frozen parts, then LoRA (or QLoRA) adapters when asked for."""
    from . import lora

    if not options.lora:
        lora.freeze(model, options.freeze)
        return model
    if options.qlora:
        model = lora.prepare_for_kbit_training(model, options.gradient_checkpointing)
    return lora.apply_lora(model, options.lora, frozen=options.freeze)


def build_datasets(
    options: FinetuneOptions, tokenizer: Any, config: Any, report: Callable[[str], None]
) -> tuple[Any, Any]:
    """The training and evaluation datasets (None without eval data), packed with `pack`. Reads every record
    now, so that a bad one is reported before the model is loaded; `report` hears how many were left out."""
    from .collator import PackedDataset
    from .data import ConversationDataset, RecordError

    datasets = []
    for path in (options.data, options.eval_data):
        if path is None:
            datasets.append(None)
            continue
        try:
            dataset = ConversationDataset(
                path,
                tokenizer,
                config,
                max_length=options.max_length,
                bad_records=options.bad_records,
                image_folder=options.image_folder,
                max_dynamic_patch=options.max_tiles,
            )
        except (RecordError, ValueError, FileNotFoundError) as exc:
            raise FinetuneError(str(exc)) from None
        if dataset.skipped:
            report(f"{path}: {len(dataset)} examples, left out: {dict(dataset.skipped)}")
        datasets.append(PackedDataset(dataset, options.max_length) if options.pack else dataset)
    return datasets[0], datasets[1]


def merge_adapter(model_path: str, adapter_dir: Path, output_dir: Path, dtype: Any, tokenizer: Any) -> None:
    """Load the base weights again in `dtype` (not 4-bit, for QLoRA), apply the trained adapter, merge it and save
    a plain model directory with the tokenizer and processor."""
    import peft
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ..modeling_nvlm_d import NVLM_D_Model
    from ..processing_nvlm_d import NVLM_D_Processor
    from .lora import save_merged

    unset_hf_deepspeed_config()  # a plain, whole model in this process
    base = NVLM_D_Model.from_pretrained(model_path, dtype=dtype)
    adapted = peft.PeftModel.from_pretrained(base, adapter_dir)
    processor = NVLM_D_Processor.from_model_config(base.config, tokenizer)
    save_merged(adapted, output_dir, tokenizer=tokenizer, processor=processor)


def check_output(output: str, model_path: str) -> None:
    """Refuse an output folder that is the model directory, lies inside it or holds it: the fine-tuned weights
    would overwrite the base model's, and checkpoint rotation deletes `checkpoint-N` folders of the output (the base
    model, if it is one of them)."""
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
        raise FinetuneError(
            f"--output {output} {problem}: the fine-tuned model would be written over (or beside) the base model's "
            "files. Choose a folder of its own"
        )


def run_record(options: FinetuneOptions, global_step: int, mean_loss: float | None) -> dict[str, Any]:
    """The contents of `RUN_RECORD`: the step the model is from, the length the run was asked for, its loss."""
    return {
        "global_step": global_step,
        "max_steps": options.max_steps,
        "epochs": options.epochs if options.max_steps is None else None,
        "mean_loss_of_last_run": mean_loss,
    }


def write_run_record(output: Path, record: dict[str, Any]) -> None:
    """`RUN_RECORD` in `output`, written beside and renamed: it says which step the model in `output` is from."""
    temporary = output / (RUN_RECORD + ".tmp")
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, output / RUN_RECORD)


def training_done(output: Path, options: FinetuneOptions) -> tuple[Path, dict[str, Any]] | None:
    """When training in `output` is over for these options' `max_steps` or `epochs` (running it again would only
    train past its end): the newest complete checkpoint and the run's record, which is empty when the model of that
    step was never written (the run stopped while saving it). Else None.

    transformers' Trainer, resumed from the checkpoint of the last step, runs one more step when that step does not
    end an epoch; so whether anything is left to train is decided here, from the newest complete checkpoint.
    """
    from .trainer import latest_complete_checkpoint

    latest = latest_complete_checkpoint(output)
    if latest is None:
        return None
    step = int(latest.name.removeprefix("checkpoint-"))
    record_path = output / RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if options.max_steps is not None:
        done = step >= options.max_steps
    else:  # the steps of N epochs depend on the data, the batch and the world size: the record knows them
        done = record.get("global_step") == step and record.get("epochs") == options.epochs
    if not done:
        return None
    return latest, record if record.get("global_step") == step else {}


def export_checkpoint(checkpoint: Path, options: FinetuneOptions, dtype: Any, tokenizer: Any) -> None:
    """Write the model of a finished run from its last checkpoint, as the end of a run does: the adapter (merged
    unless `no_merge`) with LoRA, else the whole model, with the tokenizer and processor."""
    from ..modeling_nvlm_d import NVLM_D_Model
    from ..processing_nvlm_d import NVLM_D_Processor

    output = Path(options.output)
    if options.lora:
        adapter = output / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        for file in checkpoint.glob("adapter_*"):
            shutil.copy2(file, adapter / file.name)
        if not options.no_merge:
            merge_adapter(options.model, adapter, output, dtype, tokenizer)
        return
    model = NVLM_D_Model.from_pretrained(checkpoint, dtype=dtype)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    NVLM_D_Processor.from_model_config(model.config, tokenizer).save_pretrained(output)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def finetune(options: FinetuneOptions, report: Callable[[str], None] = logger.info) -> FinetuneResult:
    """Run (or resume, or finish) the fine-tuning run `options` describe, in this process; under a launcher, every
    process calls it. `report` hears the run's status lines (a record count left out, resuming, writing the model
    of a finished run). Raises FinetuneError for options, data or a model that cannot run."""
    check_output(options.output, options.model)
    output = Path(options.output)
    done = training_done(output, options)
    if done is not None and done[1]:
        rank_zero = int(os.environ.get("RANK", "0")) == 0
        return FinetuneResult(Outcome.ALREADY_FINISHED, output, done[1]["global_step"], rank_zero)
    import torch

    cuda = torch.cuda.is_available()
    bf16 = (options.dtype or ("bf16" if cuda else "fp32")) == "bf16"
    # LoRA keeps the frozen base in bf16; full fine-tuning keeps float32 master weights and computes in bf16.
    load_dtype = torch.bfloat16 if bf16 and options.lora else torch.float32
    if done is not None:
        return _export_finished_run(done[0], options, load_dtype, report)
    return _train(options, cuda, bf16, load_dtype, report)


def _export_finished_run(
    checkpoint: Path, options: FinetuneOptions, dtype: Any, report: Callable[[str], None]
) -> FinetuneResult:
    """Trained to the end, but stopped while writing the model: write it (in the main process), do not train."""
    from transformers import AutoTokenizer

    output = Path(options.output)
    step = _step(checkpoint)
    adapter = output / "adapter" if options.lora else None
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        report(f"training ended at {checkpoint}, but its model was not written: writing it now")
        tokenizer = AutoTokenizer.from_pretrained(options.model)
        export_checkpoint(checkpoint, options, dtype, tokenizer)
        write_run_record(output, run_record(options, step, None))
    return FinetuneResult(Outcome.EXPORTED, output, step, main_process, steps_before=step, adapter=adapter)


def _train(
    options: FinetuneOptions, cuda: bool, bf16: bool, dtype: Any, report: Callable[[str], None]
) -> FinetuneResult:
    from transformers import AutoTokenizer, set_seed

    from ..configuration_nvlm_d import NVLM_D_Config
    from ..processing_nvlm_d import NVLM_D_Processor
    from .collator import DataCollator
    from .data import RecordError
    from .trainer import build_trainer, latest_complete_checkpoint

    output = Path(options.output)
    # The data is checked first: a bad record is reported in seconds, not after minutes of loading the model.
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    config = NVLM_D_Config.from_pretrained(options.model)
    train_dataset, eval_dataset = build_datasets(options, tokenizer, config, report)
    set_seed(options.seed)  # before the adapters are created: their initial weights come from this seed
    training_args = training_arguments(options, cuda, bf16)
    model = prepare_model(load_model(options.model, options, dtype), options)
    trainer = build_trainer(
        model,
        training_args,
        train_dataset,
        DataCollator(tokenizer.pad_token_id, config.force_image_size),
        eval_dataset=eval_dataset,
    )
    resume = latest_complete_checkpoint(output)
    if resume is not None and trainer.is_world_process_zero():
        report(f"resuming from {resume}")
    steps_before = _step(resume) if resume is not None else 0
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except RecordError as exc:  # an image that changed after the up-front check; from a worker, named again
        raise FinetuneError(exc.record_message()) from None
    adapter = output / "adapter" if options.lora else None
    trainer.save_model(str(adapter or output))
    trainer.accelerator.wait_for_everyone()
    main_process = trainer.is_world_process_zero()
    if main_process:
        if options.lora and not options.no_merge:
            merge_adapter(options.model, adapter, output, dtype, tokenizer)
        elif not options.lora:
            tokenizer.save_pretrained(output)
            NVLM_D_Processor.from_model_config(trainer.model.config, tokenizer).save_pretrained(output)
        trained = result.global_step > steps_before
        write_run_record(output, run_record(options, result.global_step, result.training_loss if trained else None))
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(
        Outcome.TRAINED, output, result.global_step, main_process, steps_before, result.training_loss, adapter
    )
