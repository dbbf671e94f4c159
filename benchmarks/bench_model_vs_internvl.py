"""NVLM-D against transformers' own InternVL holding the same random weights, side by side in one run.

A scaled NVLM-D (vision and decoder widths 256, 4 + 4 layers, the real 448 px tiles and 152,064-token vocabulary,
attention padded with dummy heads in NVLM's proportion, 8 real + 2 dummy, zeroed as in the released checkpoint) and
`InternVLForConditionalGeneration` built from its weights (tests/internvl_twin.py) run the same work:

  vision    7 tiles through the vision tower and projector
  prefill   7 tiles + a chat prompt: image features merged, one decoder pass, last-token logits
  decode    per-token time of greedy decoding (32 tokens, from the difference of 33- and 1-token generations)
  generate  prefill + 32 greedy tokens, end to end (the tokens must be equal)
  peak RSS  resident memory added by one end-to-end generation (sampled each ms), each model in a fresh process

Ratios are InternVL time / NVLM-D time: above 1 means NVLM-D is faster.

    python benchmarks/bench_model_vs_internvl.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from nvlm_d.conversation import build_prompt
from nvlm_d.tiny import build_benchmark_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from internvl_twin import internvl_twin  # noqa: E402  (a test oracle, not part of the package)

TILES = 7
NEW_TOKENS = 32
QUESTION = "Please describe the image shortly."


def build_models():
    ours = build_benchmark_model(seed=0)
    return ours, internvl_twin(ours)


def inputs():
    from transformers import AutoTokenizer

    from nvlm_d.tiny import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    input_ids = tokenizer(build_prompt(QUESTION, [TILES]), return_tensors="pt").input_ids
    pixel_values = torch.randn(TILES, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    return input_ids, pixel_values


def generate(model, input_ids, pixel_values, new_tokens):
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    output = model.generate(input_ids=input_ids, pixel_values=pixel_values, **settings)
    return output[:, -new_tokens:]  # NVLM-D returns new tokens only, InternVL the prompt too


def paired_median_ms(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median milliseconds of `ours()` and `theirs()`, called alternately: a machine whose speed drifts during the
    run (a shared CPU) slows both alike instead of whichever ran second."""
    ours(), theirs()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, spent in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            fn()
            spent.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def workloads(model, is_ours: bool, input_ids, pixel_values) -> dict:
    if is_ours:
        vision = lambda: model.extract_feature(pixel_values)  # noqa: E731
    else:
        vision = lambda: model.model.get_image_features(  # noqa: E731
            pixel_values=pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
    return {
        "vision": vision,
        "prefill": lambda: model(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1),
        "one token": lambda: generate(model, input_ids, pixel_values, 1),
        "full": lambda: generate(model, input_ids, pixel_values, NEW_TOKENS + 1),
        "generate": lambda: generate(model, input_ids, pixel_values, NEW_TOKENS),
    }


@torch.no_grad()
def timings(ours, twin, input_ids, pixel_values, repeats: int) -> list[tuple[str, float, float]]:
    """(metric, NVLM-D, InternVL) rows, each pair measured alternately."""
    mine, theirs = workloads(ours, True, input_ids, pixel_values), workloads(twin, False, input_ids, pixel_values)
    ms = {name: paired_median_ms(mine[name], theirs[name], repeats) for name in mine}
    decode = [(ms["full"][k] - ms["one token"][k]) / NEW_TOKENS for k in (0, 1)]
    return [
        ("vision (ms)", *ms["vision"]),
        ("prefill (ms)", *ms["prefill"]),
        ("decode (ms/token)", *decode),
        ("generate (ms)", *ms["generate"]),
    ]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_child(which: str) -> None:
    """Child mode: build one model, then report the most resident memory one generation adds, sampled every
    millisecond (the process's high-water mark would be that of building the weights)."""
    ours, twin = build_models()
    model = ours if which == "ours" else twin
    del ours, twin
    input_ids, pixel_values = inputs()
    gc.collect()
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with torch.no_grad():
        generate(model, input_ids, pixel_values, NEW_TOKENS)
    done.set()
    sampler.join()
    print(json.dumps({"peak_rss_mib": (max(peak[0], _rss_bytes()) - baseline) / 2**20}))


def peak_rss_mib(which: str) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--peak-rss-child", which], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-rss-child", choices=["ours", "internvl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss_child:
        peak_rss_child(args.peak_rss_child)
        return

    ours, twin = build_models()
    input_ids, pixel_values = inputs()
    with torch.no_grad():
        same_tokens = torch.equal(
            generate(ours, input_ids, pixel_values, NEW_TOKENS), generate(twin, input_ids, pixel_values, NEW_TOKENS)
        )
    rows = timings(ours, twin, input_ids, pixel_values, args.repeats)
    rows.append(("peak RSS (MiB)", peak_rss_mib("ours"), peak_rss_mib("internvl")))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {input_ids.shape[1]} tokens "
        f"({TILES} tiles), {NEW_TOKENS} new tokens, median of {args.repeats}"
    )
    print(f"greedy tokens equal: {same_tokens}")
    print(f"{'':<20}{'NVLM-D':>10}{'InternVL':>10}{'ratio':>8}")
    for metric, mine, theirs in rows:
        print(f"{metric:<20}{mine:>10.1f}{theirs:>10.1f}{theirs / mine:>8.2f}")
    time_ratios = [theirs / mine for metric, mine, theirs in rows[:-1]]
    print(f"geometric mean of the time ratios: {statistics.geometric_mean(time_ratios):.2f}")


if __name__ == "__main__":
    main()
