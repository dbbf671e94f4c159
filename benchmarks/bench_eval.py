"""`run_eval.py`'s `hf` backend: batched answering (`batch_chat`, --batch-size B) against one question at a time
(B = 1), on the same benchmark items, side by side in one run.

The benchmarks' scaled NVLM-D (nvlm_d.tiny.BENCHMARK_SCALE: widths 256, 4 + 4 layers, real 448 px tiles and the
152,064-token vocabulary) answers ChartQA-style items (NVLM's prompt, generated chart-like images of 1, 3, 5 and 7
tiles at NVLM's 6 tiles + thumbnail, greedy, 16 new tokens) through `nvlm_d.evaluation.backends.HFBackend`, the
code the lmms-eval model `nvlm_d` runs. Items/s is the median over --repeats (configurations interleaved, since a
shared machine's speed drifts); the answers of every configuration must equal those of B = 1.

    python benchmarks/bench_eval.py [--items 16] [--batch-sizes 4 8] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from nvlm_d.evaluation.backends import HFBackend, Request
from nvlm_d.evaluation.tasks.utils import text_short_answer
from nvlm_d.tiny import TOKENIZER_DIR, build_benchmark_model

SIZES = [(448, 448), (896, 448), (896, 896), (1344, 896)]  # 1, 3, 5 and 7 tiles (grid + thumbnail)


def make_items(count: int) -> list[Request]:
    generator = np.random.default_rng(0)
    items = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        pixels = generator.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        prompt = text_short_answer({"question": f"What is the value of bar {index}?"})
        items.append(Request(prompt, [Image.fromarray(pixels)], 16))
    return items


def run(backend: HFBackend, items: list[Request]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = backend.answer(items)
    return len(items) / (time.perf_counter() - start), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = build_benchmark_model(seed=0).to(args.device)
    if args.device != "cpu":
        model = model.to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    items = make_items(args.items)
    sizes = [1, *args.batch_sizes]
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    answers: dict[int, list[str]] = {}
    run(HFBackend(model, tokenizer, batch_size=max(sizes)), items[:2])  # warm-up
    for _ in range(args.repeats):
        for size in sizes:
            rate, answers[size] = run(HFBackend(model, tokenizer, batch_size=size), items)
            rates[size].append(rate)
    base = statistics.median(rates[1])
    print(f"{args.items} items, {args.device}, {torch.get_num_threads()} threads, repeats {args.repeats}")
    print("| batch size | items/s (median) | runs | vs one at a time | answers equal to B=1 |")
    print("|---:|---:|---|---:|---|")
    for size in sizes:
        median = statistics.median(rates[size])
        runs = ", ".join(f"{rate:.2f}" for rate in rates[size])
        print(f"| {size} | {median:.2f} | {runs} | {median / base:.2f}x | {answers[size] == answers[1]} |")


if __name__ == "__main__":
    main()
