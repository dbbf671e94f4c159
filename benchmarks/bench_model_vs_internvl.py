"""NVLM-D against transformers' own InternVL holding the same random weights, side by side in one run.

A scaled NVLM-D (by default the benchmarks' scale, nvlm_d.tiny.BENCHMARK_SCALE: vision and decoder widths 256,
4 + 4 layers, 8 real + 2 dummy heads; the arguments below change any of it) with the real 448 px tiles and
152,064-token vocabulary, its dummy heads zeroed as in the released checkpoint, and
`InternVLForConditionalGeneration` built from its weights (tests/internvl_twin.py) run the same work:

  vision    the tiles through the vision tower and projector
  prefill   the tiles + a chat prompt: image features merged, one decoder pass, last-token logits
  forward   the same with the logits of every position (what a training or scoring forward computes)
  decode    per-token time of greedy decoding (from the difference of N+1- and 1-token generations)
  generate  prefill + N greedy tokens, end to end (the tokens must be equal)
  peak RSS  resident memory added by one end-to-end generation (sampled each ms), each model in a fresh process

Ratios are InternVL time / NVLM-D time: above 1 means NVLM-D is faster. The machine this runs on may be shared and
its speed may swing, so the two models' calls alternate (in each repeat every workload runs once on each model,
the model that goes first alternating between repeats) and a ratio is taken within each repeat: the table gives
the median times and the min / median / max of the per-repeat ratios.

    python benchmarks/bench_model_vs_internvl.py [--repeats 9]
    # NVLM's head proportion at a second scale: vision width 400, 25 real + 7 dummy heads of 16, 4 layers
    python benchmarks/bench_model_vs_internvl.py --vision-width 400 --vision-heads 25 --vision-dummy-heads 7 \\
        --new-tokens 16 --repeats 9
    python benchmarks/bench_model_vs_internvl.py --profile      # where the time goes, per operator, both models
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
from collections.abc import Callable
from pathlib import Path

import torch

from nvlm_d.conversation import build_prompt
from nvlm_d.tiny import BENCHMARK_SCALE, build_tiny_model, zero_dummy_heads_

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from internvl_twin import internvl_twin  # noqa: E402  (a test oracle, not part of the package)

QUESTION = "Please describe the image shortly."
METRICS = ("vision", "prefill", "forward", "decode", "generate")


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    vision, llm = BENCHMARK_SCALE["vision_config"], BENCHMARK_SCALE["llm_config"]
    parser.add_argument("--vision-width", type=int, default=vision["hidden_size"])
    parser.add_argument("--vision-heads", type=int, default=vision["num_attention_heads"], help="real heads")
    parser.add_argument("--vision-dummy-heads", type=int, default=vision["num_dummy_heads"])
    parser.add_argument("--vision-layers", type=int, default=vision["num_hidden_layers"])
    parser.add_argument("--vision-mlp", type=int, default=None, help="MLP width (default: 4 x vision width)")
    parser.add_argument("--llm-width", type=int, default=llm["hidden_size"], help="also the MLP width (twin)")
    parser.add_argument("--llm-layers", type=int, default=llm["num_hidden_layers"])
    parser.add_argument("--llm-heads", type=int, default=llm["num_attention_heads"])
    parser.add_argument("--llm-kv-heads", type=int, default=llm["num_key_value_heads"])
    parser.add_argument("--tiles", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def scale_arguments(args: argparse.Namespace) -> list[str]:
    """The scale as command-line arguments again, for the peak-RSS child processes."""
    names = ("vision_width", "vision_heads", "vision_dummy_heads", "vision_layers", "llm_width", "llm_layers",
             "llm_heads", "llm_kv_heads", "tiles", "new_tokens", "attn", "dtype")  # fmt: skip
    argv = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names]
    return argv + ([f"--vision-mlp={args.vision_mlp}"] if args.vision_mlp else [])


def build_models(args: argparse.Namespace):
    vision = {
        "hidden_size": args.vision_width,
        "intermediate_size": args.vision_mlp or 4 * args.vision_width,
        "num_hidden_layers": args.vision_layers,
        "num_attention_heads": args.vision_heads,
        "num_dummy_heads": args.vision_dummy_heads,
    }
    llm = {
        "hidden_size": args.llm_width,
        "intermediate_size": args.llm_width,
        "num_hidden_layers": args.llm_layers,
        "num_attention_heads": args.llm_heads,
        "num_key_value_heads": args.llm_kv_heads,
    }
    ours = zero_dummy_heads_(build_tiny_model(0, vision_config=vision, llm_config=llm))
    ours = ours.to(getattr(torch, args.dtype)).eval()
    ours.set_attn_implementation(args.attn)
    twin = internvl_twin(ours)
    twin.set_attn_implementation(args.attn)
    return ours, twin


def inputs(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from nvlm_d.tiny import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    input_ids = tokenizer(build_prompt(QUESTION, [args.tiles]), return_tensors="pt").input_ids
    pixel_values = torch.randn(args.tiles, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    return input_ids, pixel_values.to(getattr(torch, args.dtype))


def generate(model, input_ids, pixel_values, new_tokens):
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    output = model.generate(input_ids=input_ids, pixel_values=pixel_values, **settings)
    return output[:, -new_tokens:]  # NVLM-D returns new tokens only, InternVL the prompt too


def workloads(model, is_ours: bool, input_ids, pixel_values, new_tokens: int) -> dict[str, Callable[[], object]]:
    if is_ours:
        vision = lambda: model.extract_feature(pixel_values)  # noqa: E731
    else:
        vision = lambda: model.model.get_image_features(  # noqa: E731
            pixel_values=pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
    return {
        "vision": vision,
        "prefill": lambda: model(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1),
        "forward": lambda: model(input_ids=input_ids, pixel_values=pixel_values),
        "one token": lambda: generate(model, input_ids, pixel_values, 1),
        "full": lambda: generate(model, input_ids, pixel_values, new_tokens + 1),
        "generate": lambda: generate(model, input_ids, pixel_values, new_tokens),
    }


CLOCK = time.perf_counter  # --cpu-time: time.thread_time, with one intra-op thread


def timed_ms(fn: Callable[[], object]) -> float:
    start = CLOCK()
    fn()
    return (CLOCK() - start) * 1000


@torch.no_grad()
def interleaved_ms(mine: dict, theirs: dict, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per workload, the milliseconds of each repeat for NVLM-D and for InternVL. In every repeat each workload
    runs on both models back to back, NVLM-D first in even repeats and InternVL first in odd ones: a machine whose
    speed drifts (a shared CPU) then slows both alike, and neither always runs on a warmer cache."""
    for name in mine:  # warm-up
        mine[name](), theirs[name]()
    times = {name: ([], []) for name in mine}
    for repeat in range(repeats):
        for name in mine:
            order = ((0, mine), (1, theirs)) if repeat % 2 == 0 else ((1, theirs), (0, mine))
            for side, calls in order:
                times[name][side].append(timed_ms(calls[name]))
    return times


def rows(times: dict, new_tokens: int, metrics: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Per metric, the per-repeat times of NVLM-D and InternVL (decode: ms per token, repeat by repeat)."""
    per_metric = {name: times[name] for name in metrics if name != "decode"}
    if "decode" in metrics:
        per_metric["decode"] = tuple(
            [(full - one) / new_tokens for full, one in zip(times["full"][k], times["one token"][k], strict=True)]
            for k in (0, 1)
        )
    return {name: per_metric[name] for name in METRICS if name in metrics}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_rss_child(args: argparse.Namespace) -> None:
    """Child mode: build one model, then report the most resident memory one generation adds, sampled every
    millisecond (the process's high-water mark would be that of building the weights)."""
    ours, twin = build_models(args)
    model = ours if args.peak_rss_child == "ours" else twin
    del ours, twin
    input_ids, pixel_values = inputs(args)
    gc.collect()
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with torch.no_grad():
        generate(model, input_ids, pixel_values, args.new_tokens)
    done.set()
    sampler.join()
    print(json.dumps({"peak_rss_mib": (max(peak[0], _rss_bytes()) - baseline) / 2**20}))


def peak_rss_mib(which: str, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--peak-rss-child", which, *scale_arguments(args)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]


@torch.no_grad()
def profile(mine: dict, theirs: dict, names: list[str], top: int) -> None:
    """torch.profiler's operator table (self CPU time) of each workload on each model, two calls each after a
    warm-up, and the operators whose totals differ most between the two."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in names:
        totals = []
        for label, calls in (("NVLM-D", mine), ("InternVL", theirs)):
            calls[name]()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                calls[name](), calls[name]()
            events = prof.key_averages()
            print(f"\n=== {name}: {label} ===")
            print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
            totals.append({event.key: (event.self_cpu_time_total / 1000, event.count) for event in events})
        keys = set(totals[0]) | set(totals[1])
        diffs = {key: totals[0].get(key, (0.0, 0))[0] - totals[1].get(key, (0.0, 0))[0] for key in keys}
        print(f"=== {name}: self CPU ms, NVLM-D minus InternVL (two calls), largest differences ===")
        for key in sorted(keys, key=lambda k: -abs(diffs[k]))[:top]:
            (ours_ms, ours_n), (their_ms, their_n) = (t.get(key, (0.0, 0)) for t in totals)
            print(f"{key[:60]:<60} {ours_ms:>10.1f} ({ours_n:>5}) {their_ms:>10.1f} ({their_n:>5}) {diffs[key]:>+9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scale_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"a comma-separated subset of {METRICS}")
    parser.add_argument("--no-peak-rss", action="store_true", help="skip the two peak-RSS child processes")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one intra-op thread, timed by its CPU time (time.thread_time): the work each model does, much less "
        "sensitive than wall time to other processes on a shared machine",
    )
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables instead of timing")
    parser.add_argument("--profile-workloads", default="vision,forward,generate")
    parser.add_argument("--peak-rss-child", choices=["ours", "internvl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    metrics = args.metrics.split(",")
    if not set(metrics) <= set(METRICS):
        parser.error(f"--metrics takes names from {METRICS}, got {args.metrics!r}")
    if args.peak_rss_child:
        peak_rss_child(args)
        return

    if args.cpu_time:
        global CLOCK
        torch.set_num_threads(1)
        CLOCK = time.thread_time
    ours, twin = build_models(args)
    input_ids, pixel_values = inputs(args)
    mine = workloads(ours, True, input_ids, pixel_values, args.new_tokens)
    theirs = workloads(twin, False, input_ids, pixel_values, args.new_tokens)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.attn}; vision width "
        f"{args.vision_width}, {args.vision_heads} + {args.vision_dummy_heads} heads, {args.vision_layers} layers; "
        f"decoder width {args.llm_width}, {args.llm_layers} layers; prompt {input_ids.shape[1]} tokens "
        f"({args.tiles} tiles), {args.new_tokens} new tokens"
    )
    if args.profile:
        profile(mine, theirs, args.profile_workloads.split(","), top=25)
        return
    with torch.no_grad():
        same_tokens = torch.equal(mine["generate"](), theirs["generate"]())
    timed = [name for name in mine if name in metrics or (name in ("one token", "full") and "decode" in metrics)]
    times = interleaved_ms({name: mine[name] for name in timed}, {name: theirs[name] for name in timed}, args.repeats)
    per_repeat = rows(times, args.new_tokens, metrics)

    clock = "CPU time of the one thread" if args.cpu_time else "wall time"
    print(f"median of {args.repeats} repeats, calls interleaved, {clock}; greedy tokens equal: {same_tokens}")
    print(f"{'':<20}{'NVLM-D':>10}{'InternVL':>10}   {'ratio: min':>10}{'median':>8}{'max':>8}")
    medians = []
    for metric, (mine_ms, their_ms) in per_repeat.items():
        ratios = [t / m for m, t in zip(mine_ms, their_ms, strict=True)]
        medians.append(statistics.median(ratios))
        unit = "ms/token" if metric == "decode" else "ms"
        print(
            f"{f'{metric} ({unit})':<20}{statistics.median(mine_ms):>10.1f}{statistics.median(their_ms):>10.1f}   "
            f"{min(ratios):>10.2f}{medians[-1]:>8.2f}{max(ratios):>8.2f}"
        )
    if not args.no_peak_rss:
        mine_mib, their_mib = peak_rss_mib("ours", args), peak_rss_mib("internvl", args)
        print(f"{'peak RSS (MiB)':<20}{mine_mib:>10.1f}{their_mib:>10.1f}   {'':>10}{their_mib / mine_mib:>8.2f}")
    print(f"geometric mean of the median time ratios: {statistics.geometric_mean(medians):.2f}")


if __name__ == "__main__":
    main()
