"""`run_eval.py`'s `hf` backend: batched answering (`batch_chat`, --batch-size B) against one question at a time
(B = 1), on the same benchmark items, side by side in one run.

The benchmarks' scaled NVLM-D (nvlm_d.tiny.BENCHMARK_SCALE: widths 256, 4 + 4 layers, real 448 px tiles and the
152,064-token vocabulary) answers ChartQA-style items (NVLM's prompt, generated chart-like images of 1, 3, 5 and 7
tiles at NVLM's 6 tiles + thumbnail, greedy, 16 new tokens) through `nvlm_d.evaluation.backends.HFBackend`, the
code the lmms-eval model `nvlm_d` runs. Within each of --repeats passes the configurations take turns slice by slice
(as many items as the largest batch), since a shared machine's speed drifts; a configuration's ratio is taken against
B = 1 of the same pass, and the median of those ratios is printed with each pass's ratio. The answers of
every configuration must equal those of B = 1. Beside it: CPU seconds per item (the process's CPU time, which other
work on a shared machine inflates less than the wall clock), and the shares of the wall time spent in the vision
tower (per tile: batching cannot shorten it) and in the LM head (the 152,064-token vocabulary, once per new token:
batching shares its weight reads).

    python benchmarks/bench_eval.py [--items 16] [--batch-sizes 4 8] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
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


class ModuleClock:
    """Wall time spent inside a module's forward calls, through forward hooks."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._started = 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, module: torch.nn.Module, inputs: object) -> None:
        self._started = time.perf_counter()

    def _stop(self, module: torch.nn.Module, inputs: object, output: object) -> None:
        self.seconds += time.perf_counter() - self._started


@dataclasses.dataclass
class Measurement:
    """One configuration's totals over one pass through the items."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    vision_s: float = 0.0
    lm_head_s: float = 0.0
    answers: list[str] = dataclasses.field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return len(self.answers) / self.wall_s

    @property
    def cpu_s_per_item(self) -> float:
        return self.cpu_s / len(self.answers)


def run_slice(
    backend: HFBackend, items: list[Request], vision: ModuleClock, lm_head: ModuleClock, totals: Measurement
) -> None:
    vision.seconds = lm_head.seconds = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    totals.answers.extend(backend.answer(items))
    totals.wall_s += time.perf_counter() - start
    totals.cpu_s += time.process_time() - cpu_start
    totals.vision_s += vision.seconds
    totals.lm_head_s += lm_head.seconds


def one_pass(model, tokenizer, items, sizes, vision, lm_head) -> dict[int, Measurement]:
    """Every configuration over all items, interleaved slice by slice (as many items as the largest batch, each
    configuration on the same slice, the first of them rotating), so that a burst of other work on the machine
    falls on all configurations alike."""
    totals = {size: Measurement() for size in sizes}
    slice_length = max(sizes)
    for number, start in enumerate(range(0, len(items), slice_length)):
        rotation = number % len(sizes)
        for size in sizes[rotation:] + sizes[:rotation]:
            backend = HFBackend(model, tokenizer, batch_size=size)
            run_slice(backend, items[start : start + slice_length], vision, lm_head, totals[size])
    return totals


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
    vision, lm_head = ModuleClock(model.vision_model), ModuleClock(model.language_model.get_output_embeddings())
    runs: dict[int, list[Measurement]] = {size: [] for size in sizes}
    run_slice(HFBackend(model, tokenizer, batch_size=max(sizes)), items[:2], vision, lm_head, Measurement())  # warm-up
    for _ in range(args.repeats):
        for size, totals in one_pass(model, tokenizer, items, sizes, vision, lm_head).items():
            runs[size].append(totals)
    print(f"{args.items} items, {args.device}, {torch.get_num_threads()} threads, repeats {args.repeats}")
    print(
        "| batch size | items/s (median) | vs one at a time (median) | per repeat | CPU s/item "
        "| vs one at a time (CPU) | vision tower | LM head | answers equal to B=1 |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for size in sizes:
        pairs = list(zip(runs[size], runs[1], strict=True))
        ratios = [mine.items_per_s / one.items_per_s for mine, one in pairs]
        cpu_ratios = [one.cpu_s_per_item / mine.cpu_s_per_item for mine, one in pairs]
        rate = statistics.median(m.items_per_s for m in runs[size])
        cpu = statistics.median(m.cpu_s_per_item for m in runs[size])
        vision_share = statistics.median(m.vision_s / m.wall_s for m in runs[size])
        head_share = statistics.median(m.lm_head_s / m.wall_s for m in runs[size])
        listed = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        equal = all(m.answers == runs[1][0].answers for m in runs[size])
        print(
            f"| {size} | {rate:.2f} | {statistics.median(ratios):.2f}x | {listed} | {cpu:.2f} "
            f"| {statistics.median(cpu_ratios):.2f}x | {vision_share:.0%} | {head_share:.0%} | {equal} |"
        )


if __name__ == "__main__":
    main()
