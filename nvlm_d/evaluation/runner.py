"""The card's evaluation command as a library call: settings file + task names -> lmms-eval's `simple_evaluate`
with the `nvlm_d` model and the `nvlm_*` tasks -> result files. `run_eval.py` and `nvlm-d eval` only parse flags
and call `run_evaluation`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..model_source import RELEASED_MODEL
from .config import load_config
from .lmms_compat import import_lmms_eval, skip_filelock3_patch

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@dataclasses.dataclass
class EvalRequest:
    """What a user asks for. `model`/`tokenizer` objects (a notebook, tests) replace `model_path`."""

    config_path: str
    result_save_path: str
    tasks: Sequence[str]
    model_path: str = RELEASED_MODEL
    backend: str = "hf"
    batch_size: int = 1
    limit: int | None = None
    data_dir: str | None = None
    gpus: int | None = None
    device: str | None = None
    dtype: str | None = None
    bits: int | None = None
    base_url: str | None = None
    served_model_name: str | None = None
    max_new_tokens: int | None = None  # overrides every task's limit
    model: Any = None
    tokenizer: Any = None


def task_configs(request: EvalRequest, chosen: Sequence[Any], task_manager: Any) -> list[dict[str, Any]]:
    """One lmms-eval task config per chosen task: its name plus the settings file's and `--data-dir`'s changes."""
    from .local_data import local_overrides

    configs = []
    for settings in chosen:
        if request.max_new_tokens:
            settings = dataclasses.replace(settings, max_new_tokens=request.max_new_tokens)
        config = {"task": settings.task, **settings.overrides()}
        if request.data_dir:
            split = settings.split or task_manager._get_config(settings.task)["test_split"]
            config.update(local_overrides(request.data_dir, settings.name, split))
        configs.append(config)
    return configs


def build_model(request: EvalRequest, max_tiles: int, journal_dir: str) -> Any:
    from .lmms_model import NVLMD

    return NVLMD(
        pretrained=request.model_path if request.model is None else None,
        backend=request.backend,
        batch_size=request.batch_size,
        max_num=max_tiles,
        gpus=request.gpus,
        device=request.device,
        dtype=request.dtype,
        bits=request.bits,
        base_url=request.base_url,
        served_model_name=request.served_model_name,
        journal_dir=journal_dir,
        model=request.model,
        tokenizer=request.tokenizer,
    )


def _process_group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _destroy_process_group() -> None:
    """Release the gloo group that lmms-eval opens for a data-parallel run and never closes: left to the
    interpreter's exit, its threads were torn down mid-shutdown, and a rank that had written every result aborted
    with "terminate called without an active exception" (SIGABRT, a failed torchrun)."""
    import torch.distributed as dist

    if _process_group_initialized():
        dist.destroy_process_group()


def run_evaluation(request: EvalRequest) -> list[Any] | None:
    """Run the chosen tasks and write the result files (rank 0). Returns the per-task results on rank 0, None on
    the other ranks of a data-parallel run.

    Raises:
        ValueError: a bad settings file, an unknown task name, a missing local data file, a bad option.
    """
    import_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .results import write_results

    if request.limit is not None and request.limit < 1:
        raise ValueError(f"limit must be >= 1, got {request.limit}")
    config = load_config(request.config_path)
    chosen = config.select(request.tasks)
    # Only the nvlm_* tasks: indexing lmms-eval's hundreds of task files costs seconds and none of them is needed.
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    tasks = task_configs(request, chosen, task_manager)
    result_dir = Path(request.result_save_path)
    result_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(request, config.max_tiles, str(result_dir / "answers"))
    skip_filelock3_patch()
    group_was_there = _process_group_initialized()
    try:
        results = simple_evaluate(
            model=model,
            tasks=tasks,
            limit=request.limit,
            task_manager=task_manager,
            log_samples=True,
            batch_size=request.batch_size,
            verbosity="WARNING",
            bootstrap_iters=0,
            distributed_executor_backend="torchrun",  # torch.distributed collectives (gloo) under torchrun, accelerate
        )
    finally:
        if not group_was_there:
            _destroy_process_group()
    if results is None:  # not rank 0
        return None
    settings = {
        "config": os.fspath(request.config_path),
        "model": request.model_path if request.model is None else type(request.model).__name__,
        "backend": request.backend,
        "batch_size": request.batch_size,
        "limit": request.limit,
        "data_dir": request.data_dir,
        "max_tiles": config.max_tiles,
    }
    return write_results(result_dir, results, chosen, settings)
