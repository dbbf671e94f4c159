"""`nvlm-d batch` throughput: the one-at-a-time loop the command ran before against batched answering (B = 1, 4, 8),
with and without images loaded ahead, on the same requests, side by side in one run.

The benchmarks' scaled NVLM-D (nvlm_d.tiny.BENCHMARK_SCALE: widths 256, 4 + 4 layers, real 448 px tiles and
152,064-token vocabulary) answers a request file of generated JPEG photos of 1 to 13 tiles (--max-num 12) mixed
with text-only questions, every answer exactly --new-tokens greedy tokens long. Each configuration writes its
records through the command's own crash-safe log (one fsync a record), from a fresh output file:

  one at a time   the loop `nvlm-d batch` ran before: decode and tile a request's images, `chat`, write the record
  B, prefetch N   the command's pipeline (`nvlm_d.batch_inference.answer_requests`): `--batch-size B --prefetch N`

Every repeat runs each configuration once, in an order rotated from repeat to repeat (repeat r starts with the
r-th configuration), so that on a machine whose load changes no configuration always runs first, last or next to
the same neighbour. A configuration's ratio is its images/s over the one-at-a-time loop's in the same repeat;
the table gives min / median / max of those per-repeat ratios, so their spread shows how far to trust them.

For each: requests/s and images/s (medians over --repeats), the ratios, where the model's thread spent its time
(vision tower, prefill, decode: forward hooks on the vision tower and the decoder; loading: decoding and tiling,
in worker threads when prefetching), the peak resident memory of the run, and whether every answer equals the
one-at-a-time loop's.

    python benchmarks/bench_batch.py [--requests 24] [--new-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the command's progress bar: not part of what is measured

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from nvlm_d.batch_inference import BatchSettings, ResultLog, answer_requests, read_requests
from nvlm_d.batch_inference import engine as batch_engine
from nvlm_d.image_inputs import TileSpec, open_image_file, stack_images, tile_image
from nvlm_d.tiny import TOKENIZER_DIR, build_benchmark_model

MAX_NUM = 12
# Image sizes and the tiles --max-num 12 cuts them into (grid + thumbnail): 1, 3, 5, 7, 9 and 13 tiles.
SIZES = {1: (448, 448), 3: (896, 448), 5: (896, 896), 7: (1344, 896), 9: (1792, 896), 13: (1792, 1344)}
# The request mix, repeated: 0 is a text-only question.
MIX = [13, 0, 1, 7, 3, 0, 9, 5]
QUESTIONS = ["Describe the picture.", "What colour is the ellipse?", "Is there anything unusual here?", "Caption it."]
TEXT_QUESTIONS = ["What is the capital of France?", "Write one sentence about the sea, please."]


def make_requests(directory: Path, count: int, new_tokens: int) -> Path:
    """A JSONL request file and its JPEG photos (one file per request, so nothing is decoded twice)."""
    generator = np.random.default_rng(0)
    lines = []
    for k in range(count):
        tiles = MIX[k % len(MIX)]
        request = {"id": f"r{k:03d}", "min_new_tokens": new_tokens}
        if tiles:
            width, height = SIZES[tiles]
            x, y = np.meshgrid(np.arange(width), np.arange(height))
            pixels = np.stack([x * 255 // width, y * 255 // height, (x + y + 40 * k) % 256], axis=-1)
            pixels = pixels + generator.integers(0, 24, pixels.shape)  # photo-like noise: JPEG decoding does work
            path = directory / f"photo-{k:03d}.jpg"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)
            request.update(image=path.name, question=QUESTIONS[k % len(QUESTIONS)])
        else:
            request["question"] = TEXT_QUESTIONS[k % len(TEXT_QUESTIONS)]
        lines.append(json.dumps(request))
    path = directory / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class Clock:
    """Where the model's thread spends its time: forward hooks on the vision tower and the decoder (a decoder call
    over more than one token is a prefill, over one a decode step), and a wrapper around request loading."""

    def __init__(self, model) -> None:
        self.seconds = {"vision": 0.0, "prefill": 0.0, "decode": 0.0, "loading": 0.0}
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        model.vision_model.register_forward_pre_hook(lambda module, args: self._start("vision"))
        model.vision_model.register_forward_hook(lambda module, args, output: self._stop("vision"))
        model.language_model.register_forward_pre_hook(self._decoder_started, with_kwargs=True)
        model.language_model.register_forward_hook(lambda module, args, output: self._stop("decoder"))

    def _decoder_started(self, module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        self._kind = "prefill" if embeds is not None and embeds.shape[1] > 1 else "decode"
        self._start("decoder")

    def _start(self, name: str) -> None:
        self._started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        spent = time.perf_counter() - self._started.pop(name)
        self.add(self._kind if name == "decoder" else name, spent)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def timed_load(self, load):
        def wrapped(*args, **kwargs):
            started = time.perf_counter()
            try:
                return load(*args, **kwargs)
            finally:
                self.add("loading", time.perf_counter() - started)

        return wrapped


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_at_a_time(requests, log, model, tokenizer, settings: BatchSettings, clock) -> None:
    """The loop `nvlm-d batch` ran before batching: load the images on this thread, `chat`, write the record."""
    spec = TileSpec.of(model.config)
    for request in requests:
        started = time.perf_counter()
        images = [tile_image(open_image_file(path), settings.max_num, spec) for path in request.images]
        clock.add("loading", time.perf_counter() - started)
        pixel_values, num_patches_list = stack_images(images)
        generation = {"max_new_tokens": settings.max_new_tokens, "do_sample": False, **request.generation}
        answer = model.chat(tokenizer, pixel_values, request.question, generation, num_patches_list=num_patches_list)
        log.append({"id": request.id, "answer": answer, "seconds": round(time.perf_counter() - started, 3)})


def rotated(configs: list, repeat: int) -> list:
    """The configurations in the order repeat `repeat` runs them: rotated by one place per repeat."""
    start = repeat % len(configs)
    return configs[start:] + configs[:start]


@dataclasses.dataclass
class Result:
    seconds: list[float] = dataclasses.field(default_factory=list)
    parts: list[dict] = dataclasses.field(default_factory=list)
    peak_mib: list[float] = dataclasses.field(default_factory=list)
    answers: list[dict] = dataclasses.field(default_factory=list)  # one dict (id -> answer) per run


def run(name, batch_size, prefetch, requests, model, tokenizer, new_tokens, clock, directory, result) -> None:
    settings = BatchSettings(
        max_num=MAX_NUM, max_new_tokens=new_tokens, batch_size=batch_size or 1, prefetch=prefetch, seed=0
    )
    output = directory / f"{name.replace(' ', '-').replace(',', '')}.jsonl"
    output.unlink(missing_ok=True)
    log = ResultLog(output)
    clock.reset()
    reset_peak_rss()
    started = time.perf_counter()
    try:
        with torch.no_grad():
            if batch_size is None:
                one_at_a_time(requests, log, model, tokenizer, settings, clock)
            else:
                answer_requests(requests, log, model, tokenizer, settings)
    finally:
        log.close()
    result.seconds.append(time.perf_counter() - started)
    result.parts.append(dict(clock.seconds))
    result.peak_mib.append(peak_rss_mib())
    records = map(json.loads, output.read_text().splitlines())
    result.answers.append({record["id"]: record["answer"] for record in records})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = build_benchmark_model(seed=0)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    clock = Clock(model)
    batch_engine._load_request = clock.timed_load(batch_engine._load_request)
    configs = [("one at a time", None, 0)]
    configs += [(f"B={b}, prefetch {p}", b, p) for b in (1, 4, 8) for p in (0, batch_engine.DEFAULT_PREFETCH)]

    with tempfile.TemporaryDirectory(prefix="bench_batch-") as temporary:
        directory = Path(temporary)
        requests = read_requests(make_requests(directory, args.requests, args.new_tokens))
        warm_up = Result()
        run("warm up", 2, 0, requests[:2], model, tokenizer, args.new_tokens, clock, directory, warm_up)
        results = {name: Result() for name, _, _ in configs}
        for repeat in range(args.repeats):
            for name, batch_size, prefetch in rotated(configs, repeat):
                run(name, batch_size, prefetch, requests, model, tokenizer, args.new_tokens, clock, directory,
                    results[name])  # fmt: skip

    images = sum(len(request.images) for request in requests)
    counts = [MIX[k % len(MIX)] for k in range(args.requests)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{args.requests} requests: "
        f"{images} JPEG photos of {min(c for c in counts if c)}-{max(counts)} tiles "
        f"({sum(counts)} tiles), {counts.count(0)} text-only; {args.new_tokens} greedy tokens an answer; "
        f"medians of {args.repeats} repeats, configurations in rotated order"
    )
    baseline = results["one at a time"]
    header = (
        f"{'':<20}{'req/s':>7}{'img/s':>7}  {'ratio: min':>10}{'median':>7}{'max':>6}  {'vision':>7}{'prefill':>8}"
        f"{'decode':>7}{'loading':>8}{'total':>7}  {'peak RSS':>9}  answers"
    )
    print(header)
    print(f"{'':<58}{'seconds on the model thread (loading: all threads)':>52}")
    for name, _, _ in configs:
        result = results[name]
        seconds = statistics.median(result.seconds)
        # images/s over the baseline's in the same repeat = baseline seconds / these seconds
        ratios = [base / mine for base, mine in zip(baseline.seconds, result.seconds, strict=True)]
        parts = {key: statistics.median(part[key] for part in result.parts) for key in result.parts[0]}
        equal = all(answers == baseline.answers[0] for answers in result.answers + baseline.answers)
        print(
            f"{name:<20}{args.requests / seconds:>7.2f}{images / seconds:>7.2f}  {min(ratios):>9.2f}x"
            f"{statistics.median(ratios):>6.2f}x{max(ratios):>5.2f}x"
            f"  {parts['vision']:>7.1f}{parts['prefill']:>8.1f}{parts['decode']:>7.1f}{parts['loading']:>8.1f}"
            f"{seconds:>7.1f}  {statistics.median(result.peak_mib):>6.0f} MiB  {'equal' if equal else 'DIFFER'}"
        )


if __name__ == "__main__":
    main()
