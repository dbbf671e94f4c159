"""Greedy generation with vLLM's own NVLM-D, for the parity test (tests/test_serving.py) and docs/serving.md.

Runs in vLLM's environment, not the package's (vLLM pins its own torch and transformers), and imports nothing from
`nvlm_d`: the model directory is loaded as vLLM loads any NVLM-D checkpoint, `LLM(model=DIR)` with the directory's
remote config code and no `hf_overrides`. Requests come from a JSON file and the results go to another, so the
comparison with the package happens in the caller's interpreter.

    python tools/vllm_generate.py REQUESTS.json RESULTS.json

REQUESTS.json: {"model": DIR, "max_new_tokens": N, "max_model_len": L, "dtype": "float32", "kv_cache_bytes": B,
                "requests": [{"name": ..., "prompt": TEXT, "image": PNG} | {"name": ..., "prompt_token_ids": [...]}]}
RESULTS.json:  {"vllm": version, "transformers": version, "architectures": [...], "config_class": name,
                "load_seconds": s, "generate_seconds": s,
                "results": {name: {"prompt_token_ids": [...], "token_ids": [...], "logprobs": [...]}}}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def build_prompts(requests: list[dict]) -> list[dict]:
    """vLLM prompts: text with an image for the multimodal requests, token ids for the others."""
    from PIL import Image

    prompts = []
    for request in requests:
        if "image" in request:
            image = Image.open(request["image"]).convert("RGB")
            prompts.append({"prompt": request["prompt"], "multi_modal_data": {"image": image}})
        else:
            prompts.append({"prompt_token_ids": request["prompt_token_ids"]})
    return prompts


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())

    import transformers
    import vllm
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        trust_remote_code=True,
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec["max_model_len"],
        limit_mm_per_prompt={"image": 1},
        kv_cache_memory_bytes=spec["kv_cache_bytes"],
        enforce_eager=True,  # no torch.compile: minutes on two cores, and the same numbers
        seed=0,
    )
    loaded = time.perf_counter()
    sampling = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], logprobs=1)
    outputs = llm.generate(build_prompts(spec["requests"]), sampling)
    generated = time.perf_counter()

    results = {}
    for request, output in zip(spec["requests"], outputs, strict=True):
        completion = output.outputs[0]
        steps = zip(completion.logprobs, completion.token_ids, strict=True)
        results[request["name"]] = {
            "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(completion.token_ids),
            "logprobs": [step[token].logprob for step, token in steps],
        }
    report = {
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "architectures": list(llm.model_config.architectures),
        "config_class": type(llm.model_config.hf_config).__name__,
        "load_seconds": round(loaded - started, 2),
        "generate_seconds": round(generated - loaded, 2),
        "results": results,
    }
    Path(argv[1]).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
