"""Follow-up turns: recomputing the whole conversation (`chat(history=...)`) against reusing its KV cache
(`model.start_chat(...)`), side by side in one run.

The benchmarks' scaled NVLM-D (nvlm_d.tiny.BENCHMARK_SCALE: widths 256, 4 + 4 layers, real 448 px tiles and
vocabulary) answers a 4-turn conversation about one 7-tile image, 16 greedy tokens a turn, both ways, the two ways
interleaved turn by turn. For turns 2-4 it reports the time to the first answer token and the time of the whole
turn (medians over the repeats), their ratios, and whether both ways gave the same answers.

    python benchmarks/bench_chat_turns.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoTokenizer

from nvlm_d.tiny import TOKENIZER_DIR, build_benchmark_model

TILES = 7
NEW_TOKENS = 16
QUESTIONS = ["What is in the picture?", "What colour is it?", "Is it large or small?", "Describe it once more."]


class FirstTokenClock:
    """A streamer that notes when the first generated token arrives (generate's first `put` is the prompt)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
        elif self.first_token is None:
            self.first_token = time.perf_counter()

    def end(self) -> None:
        pass


def timed(turn) -> tuple[str, float, float]:
    """(answer, ms to the first token, ms of the whole turn) of `turn(streamer)`."""
    clock = FirstTokenClock()
    answer = turn(clock)
    total = time.perf_counter() - clock.started
    return answer, (clock.first_token - clock.started) * 1000, total * 1000


def conversation(model, tokenizer, pixel_values, settings) -> tuple[list, list]:
    """One conversation each way, turn by turn: [(answer, first-token ms, turn ms)] for recompute and reuse."""
    session = model.start_chat(tokenizer, settings)
    history, recompute, reuse = None, [], []
    for number, question in enumerate(QUESTIONS):
        answer, first, total = timed(
            lambda clock, q=question: model.chat(
                tokenizer, pixel_values, q, settings, history=history, return_history=True, streamer=clock
            )
        )
        recompute.append((answer[0], first, total))
        history = answer[1]
        images = pixel_values if number == 0 else None
        reuse.append(timed(lambda clock, q=question, i=images: session.ask(q, i, streamer=clock)))
    return recompute, reuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = build_benchmark_model(seed=0)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    pixel_values = torch.randn(TILES, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    settings = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    with torch.no_grad():
        conversation(model, tokenizer, pixel_values, settings)  # warm-up
        runs = [conversation(model, tokenizer, pixel_values, settings) for _ in range(args.repeats)]

    same = all([a for a, _, _ in recompute] == [a for a, _, _ in reuse] for recompute, reuse in runs)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {TILES}-tile image, {NEW_TOKENS} new tokens "
        f"a turn, median of {args.repeats}; answers equal: {same}"
    )
    print(f"{'turn':<6}{'first token (ms)':>32}{'whole turn (ms)':>32}")
    print(f"{'':<6}{'recompute':>11}{'reuse':>9}{'ratio':>12}{'recompute':>11}{'reuse':>9}{'ratio':>12}")
    first_ratios = []
    for turn in range(1, len(QUESTIONS)):
        first = [statistics.median(run[way][turn][1] for run in runs) for way in (0, 1)]
        total = [statistics.median(run[way][turn][2] for run in runs) for way in (0, 1)]
        first_ratios.append(first[0] / first[1])
        print(
            f"{turn + 1:<6}{first[0]:>11.1f}{first[1]:>9.1f}{first[0] / first[1]:>11.2f}x"
            f"{total[0]:>11.1f}{total[1]:>9.1f}{total[0] / total[1]:>11.2f}x"
        )
    print(f"first-token speed-up, geometric mean of turns 2-4: {statistics.geometric_mean(first_ratios):.2f}x")


if __name__ == "__main__":
    main()
