"""Measure the package against vLLM's own NVLM-D on the CPU: the figures of docs/serving.md.

    NVLM_D_VLLM_PYTHON=$(python tools/cached_envs.py vllm) python tools/vllm_parity_report.py [--max-new-tokens 12]

Saves the parity checkpoint of tests/test_serving.py (a tiny NVLM-D with head_dim 64, seed 0) and a seeded
1000x600 image, runs vLLM on an image prompt and a text prompt in its own environment (tools/vllm_generate.py),
then the package's `generate` on the prompt ids vLLM used, and prints, per prompt: prompt tokens, whether the
greedy tokens are equal, the largest difference of their log-probabilities, the smallest gap between the best and
second-best logit the package saw (how far from a tie the greedy choices were), and the wall-clock seconds of
each side. The tiny model's weights are random: this measures agreement and overheads, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer

from nvlm_d import build_prompt, load_image
from nvlm_d.tiny import save_tiny_checkpoint

TOOLS = Path(__file__).resolve().parent
QUESTION = "Describe the image."
TEXT_QUESTION = "Hello, who are you?"


def package_run(model, prompt_ids: list[int], pixel_values, max_new_tokens: int) -> dict:
    input_ids = torch.tensor([prompt_ids])
    started = time.perf_counter()
    output = model.generate(
        pixel_values=pixel_values,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    seconds = time.perf_counter() - started
    tokens = output.sequences[0].tolist()
    logprobs, gaps = [], []
    for scores, token in zip(output.scores, tokens, strict=True):
        logprobs.append(torch.log_softmax(scores[0].float(), -1)[token].item())
        top = torch.topk(scores[0].float(), 2).values
        gaps.append((top[0] - top[1]).item())
    return {"tokens": tokens, "logprobs": logprobs, "min_gap": min(gaps), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    vllm_python = os.environ.get("NVLM_D_VLLM_PYTHON")
    if not vllm_python:
        parser.error("set NVLM_D_VLLM_PYTHON to vLLM's interpreter (python tools/cached_envs.py vllm)")

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        checkpoint = save_tiny_checkpoint(
            work / "checkpoint",
            seed=0,
            vision_config={"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256},
            llm_config={
                "hidden_size": 256,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 512,
            },
        )
        image = work / "noise.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(600, 1000, 3), dtype=np.uint8)).save(image)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
        spec = {
            "model": str(checkpoint),
            "max_new_tokens": args.max_new_tokens,
            "max_model_len": 4096,
            "dtype": "float32",
            "kv_cache_bytes": 1 << 30,
            "requests": [
                {
                    "name": "image",
                    "prompt": tokenizer.apply_chat_template([turn], add_generation_prompt=True, tokenize=False),
                    "image": str(image),
                },
                {"name": "text", "prompt_token_ids": tokenizer(build_prompt(TEXT_QUESTION)).input_ids},
            ],
        }
        (work / "requests.json").write_text(json.dumps(spec))
        started = time.perf_counter()
        subprocess.run(
            [vllm_python, str(TOOLS / "vllm_generate.py"), "requests.json", "results.json"],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        vllm_process_seconds = time.perf_counter() - started
        vllm = json.loads((work / "results.json").read_text())

        started = time.perf_counter()
        model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
        package_load_seconds = time.perf_counter() - started
        pixel_values = load_image(str(image), max_num=model.config.max_dynamic_patch)
        own_ids = tokenizer(build_prompt(QUESTION, [pixel_values.shape[0]])).input_ids

        print(f"vLLM {vllm['vllm']} (transformers {vllm['transformers']}), architectures {vllm['architectures']}")
        print(
            f"load: vLLM {vllm['load_seconds']:.1f} s (engine start, whole process {vllm_process_seconds:.1f} s), "
            f"package {package_load_seconds:.1f} s"
        )
        print(f"{'prompt':<7}{'tokens':>8}{'equal':>7}{'max |dlogp|':>13}{'min gap':>9}{'package s':>11}")
        for name, images in (("image", pixel_values), ("text", None)):
            theirs = vllm["results"][name]
            ours = package_run(model, theirs["prompt_token_ids"], images, args.max_new_tokens)
            difference = max(abs(a - b) for a, b in zip(ours["logprobs"], theirs["logprobs"], strict=True))
            print(
                f"{name:<7}{len(theirs['prompt_token_ids']):>8}{str(ours['tokens'] == theirs['token_ids']):>7}"
                f"{difference:>13.1e}{ours['min_gap']:>9.4f}{ours['seconds']:>11.2f}"
            )
        print(f"vLLM generate (both prompts, one batch): {vllm['generate_seconds']:.1f} s")
        own = package_run(model, own_ids, pixel_values, args.max_new_tokens)
        print(
            f"image prompt: vLLM {len(vllm['results']['image']['prompt_token_ids'])} tokens, the package's own "
            f"tokenization {len(own_ids)} (vLLM encodes '</Image>' and the newline after it apart); greedy tokens "
            f"from the package's own ids equal vLLM's: {own['tokens'] == vllm['results']['image']['token_ids']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
