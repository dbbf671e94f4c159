"""Sampling in a batch, one generator per request: a request's sampled answer depends on its seed (from the run's
seed and its id), never on which requests share its batch, so that a resumed run samples as an uninterrupted one.

Imports torch and transformers only inside functions.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

# What `generate` uses for the sampling settings a request and the model's generation_config leave unset
# (transformers' GenerationConfig defaults; a test compares sampled answers with transformers' own sampling).
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
# Sampling warpers `SeededSampler` does not apply: a model whose generation_config sets one of them to a value
# that changes the distribution samples one request at a time with transformers' own sampling.
_NEUTRAL_WARPERS = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}


def request_seed(base_seed: int, request_id: Any) -> int:
    """The seed of a request's sampled answer: from the run's seed and its id, so that a resumed run samples as an
    uninterrupted one, whatever the batch the request lands in."""
    return base_seed + zlib.crc32(json.dumps(request_id).encode())


def seeded_sampling_applies(generation: dict, model_generation_config: Any) -> bool:
    """Whether `SeededSampler` samples this request exactly as `generate(do_sample=True)` would."""
    if generation.get("num_beams", 1) != 1 or generation.get("repetition_penalty", 1.0) != 1.0:
        return False
    return all(
        getattr(model_generation_config, name, neutral) in (None, neutral) for name, neutral in _NEUTRAL_WARPERS.items()
    )


def sampling_settings(generation: dict, model_generation_config: Any) -> dict[str, Any]:
    """temperature, top_k and top_p as `generate` resolves them: the request's, else the model's
    generation_config's, else transformers' defaults."""
    resolved = {}
    for name, default in _SAMPLING_DEFAULTS.items():
        value = generation.get(name)
        if value is None:
            value = getattr(model_generation_config, name, None)
        resolved[name] = default if value is None else value
    return resolved


class SeededSampler:
    """A logits processor that samples every batch row from its own `torch.Generator`, so that a request's sampled
    answer depends on its seed and not on which requests share its batch.

    It does what `generate(do_sample=True)` does after its logits processors — temperature, top-k, top-p
    (transformers' own warpers), softmax, `torch.multinomial` of one token — with the row's generator instead of
    the global one, and leaves the drawn token as the row's only finite score: `generate` then runs greedy
    (`do_sample=False`) and takes it. Seeded like `torch.manual_seed(seed)` seeds the global generator, one
    request alone gets exactly the tokens `torch.manual_seed(seed); chat(..., do_sample=True)` gives.
    """

    def __init__(self, seeds: list[int], temperature: float, top_k: int, top_p: float) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.seeds = seeds
        self._generators: list[Any] | None = None
        self._warpers: list[Any] = []  # in the order transformers applies them
        if temperature != 1.0:
            self._warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self._warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"SeededSampler has {len(self.seeds)} seeds but the batch has {scores.shape[0]} rows")
        if self._generators is None:
            self._generators = [torch.Generator(device=scores.device).manual_seed(seed) for seed in self.seeds]
        for warper in self._warpers:
            scores = warper(input_ids, scores)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        tokens = torch.cat(
            [torch.multinomial(probs[row : row + 1], 1, generator=g) for row, g in enumerate(self._generators)]
        )
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens, 0.0)
