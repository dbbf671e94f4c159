"""The lmms-eval model `nvlm_d`: NVLM-D answering lmms-eval's requests through the `hf` or the `openai` backend.

Registered with lmms-eval through the `lmms_eval.models` entry point (`MANIFEST`), so that
`python -m lmms_eval --model nvlm_d --model_args pretrained=PATH --tasks nvlm_chartqa --include_path ...` works as
well as `run_eval.py`. Data parallel: under `torchrun`/`accelerate launch` lmms-eval gives each rank its own share of
the documents and gathers the results; this class only puts each rank's replica on its own GPUs.
"""

from __future__ import annotations

import os
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm
from transformers.utils import logging

from .backends import BACKENDS, HFBackend, OpenAIBackend, Placement, Request, load_hf_model
from .journal import AnswerJournal, answer_key
from .lmms_compat import skip_filelock3_patch
from .prompts import MAX_NEW_TOKENS, MAX_TILES

logger = logging.get_logger(__name__)

MODEL_NAME = "nvlm_d"
SORT_WINDOW_BATCHES = 4  # requests are sorted by cost within windows of this many batches (their images in memory)
MANIFEST = ModelManifest(model_id=MODEL_NAME, simple_class_path="nvlm_d.evaluation.lmms_model.NVLMD")


def _model_tag(backend: str, pretrained: str | None, served_model_name: str | None, model: Any) -> str:
    """Which model answered, for the answer journal: a resumed run reuses only the same model's answers."""
    if backend == "openai":
        return f"openai:{served_model_name}"
    if model is not None:
        return str(getattr(model, "name_or_path", None) or type(model).__name__)
    return str(pretrained)


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "", "None") else int(value)


class NVLMD(lmms):
    """NVLM-D for lmms-eval. `model_args` (as `key=value,...` on lmms-eval's command line):

    - `backend`: `hf` (default) or `openai`;
    - hf: `pretrained` (model directory or Hub id), `gpus` (GPUs per replica, the card's layer split), `device`,
      `dtype` (bf16/fp16/fp32), `bits` (8 or 4: bitsandbytes on the decoder), `max_num` (tiles); the batch size is
      lmms-eval's `--batch_size`, which it passes beside `model_args` (both at once is a duplicate argument);
    - openai: `base_url` (e.g. http://localhost:8000/v1), `served_model_name`, `api_key`;
    - `journal_dir`: keep every answer there as soon as it exists, and reuse the answers found there (resume).

    `model` and `tokenizer` may be given as objects instead of `pretrained` (a notebook, the tests).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        backend: str = "hf",
        batch_size: int | str = 1,
        max_num: int | str = MAX_TILES,
        gpus: int | str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        bits: int | str | None = None,
        base_url: str | None = None,
        served_model_name: str | None = None,
        api_key: str | None = None,
        journal_dir: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        skip_filelock3_patch()  # `python -m lmms_eval` would fail under filelock 4 (see lmms_compat)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        replica = int(os.environ.get("LOCAL_RANK", 0))
        self.backend_name = backend
        self.journal = AnswerJournal(journal_dir, self._rank) if journal_dir else None
        self.model_tag = _model_tag(backend, pretrained, served_model_name, model)
        if unused:
            logger.warning("nvlm_d ignores these model arguments: %s", ", ".join(sorted(unused)))
        if backend == "openai":
            if not base_url or not served_model_name:
                raise ValueError("the openai backend needs base_url and served_model_name")
            self.backend = OpenAIBackend(base_url, served_model_name, api_key)
            self.batch_size = int(batch_size)
            return
        if model is None:
            if not pretrained:
                raise ValueError("the hf backend needs pretrained=PATH (or a model and tokenizer)")
            placement = Placement(_optional_int(gpus), device or None, dtype or None, _optional_int(bits))
            model, tokenizer = load_hf_model(pretrained, placement, replica=replica)
        elif tokenizer is None:
            raise ValueError("a model object needs its tokenizer too")
        self.backend = HFBackend(model, tokenizer, batch_size=int(batch_size), max_num=int(max_num))
        self.batch_size = int(batch_size)

    @property
    def device(self) -> Any:
        """Where lmms-eval puts its own bookkeeping tensors (the per-rank request counts it gathers): the CPU, so
        that its gloo process group works whatever GPUs the model sits on; the model places its inputs itself."""
        return "cpu"

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order, with a progress bar (rate, ETA) per task. lmms-eval's `until` strings are
        ignored: NVLM stops at `<|im_end|>` and the task cuts the first line. Answers already in the journal are
        reused; new ones are journaled a batch at a time. Within windows of `SORT_WINDOW_BATCHES` batches the
        backend runs like requests together (fewer padded positions); the answers keep the requests' order."""
        keys = [self._key(instance) for instance in requests]
        answers: list[str | None] = [self.journal.get(key) if self.journal else None for key in keys]
        by_task: dict[str, list[int]] = {}
        for index, instance in enumerate(requests):
            by_task.setdefault(instance.task_name, []).append(index)
        for task, indices in by_task.items():
            todo = [index for index in indices if answers[index] is None]
            with tqdm(
                total=len(indices), initial=len(indices) - len(todo), disable=self.rank != 0, desc=task, unit="item"
            ) as progress:
                window_size = self.batch_size * SORT_WINDOW_BATCHES
                for start in range(0, len(todo), window_size):
                    self._answer_window(requests, todo[start : start + window_size], keys, answers, progress)
        return [answer or "" for answer in answers]

    def _answer_window(
        self, requests: list[Instance], window: list[int], keys: list[str], answers: list[str | None], progress: Any
    ) -> None:
        """Answer the requests at `window` (indices into `requests`) in the backend's batches, which group requests
        of similar cost (see `HFBackend.batches`); each answer lands at its request's index, and each batch's
        answers are journaled as soon as they exist. A window's images are all in memory at once, so a window is a
        few batches, not a task."""
        window_requests = [self._request(requests[index]) for index in window]
        for batch in self.backend.batches(window_requests):
            new = self.backend.answer([window_requests[position] for position in batch])
            done = [window[position] for position in batch]
            for index, answer in zip(done, new, strict=True):
                answers[index] = answer
            if self.journal:
                self.journal.add([(keys[index], answer) for index, answer in zip(done, new, strict=True)])
            progress.update(len(batch))

    def _key(self, instance: Instance) -> str:
        context, gen_kwargs, _, doc_id, task, _ = instance.args
        limit = int(gen_kwargs.get("max_new_tokens", MAX_NEW_TOKENS))
        return answer_key(self.model_tag, task, doc_id, context, limit)

    def _request(self, instance: Instance) -> Request:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = instance.args
        doc = self.task_dict[task][split][doc_id]
        images = [image for image in doc_to_visual(doc) if image is not None]
        limit = int(gen_kwargs.get("max_new_tokens", MAX_NEW_TOKENS))
        return Request(prompt=context, images=images, max_new_tokens=limit)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("nvlm_d answers generate_until tasks only (NVLM's benchmarks are generative)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("nvlm_d answers single-round tasks only")
