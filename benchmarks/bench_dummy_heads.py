"""The vision tower with its silent dummy heads skipped against computed, side by side in one run.

NVLM pads InternViT's 25 attention heads to 32 with 7 dummy heads whose weights are zero. `InternAttention` skips
them where that is exact (their silence decided at load; eval mode without gradients, or frozen attention weights).
This runs the same tower, same weights, with that decision on and off (the per-layer `dummy_heads_silent`):

  eager       inference, the tower as it is
  train step  forward and backward with trainable weights: every head is what runs now; "skipped" is what the
              previous design ran (forced here; exact only because these dummy weights are zero on both sides)
  compiled    inference with each encoder layer compiled by torch.compile (inductor). Before the decision became a
              plain attribute that torch.compile guards on, compiled code always computed every head.

Ratios are every-head time / skipped time (above 1: skipping is faster). The last columns compare the outputs
(last hidden states; for the train step the patch-embedding gradient) of the two, and of each against eager.

    python benchmarks/bench_dummy_heads.py                  # scaled tower on the CPU (25 + 7 heads of 16, 4 layers)
    python benchmarks/bench_dummy_heads.py --full-size      # InternViT-6B as released, bf16, on the GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from nvlm_d.configuration_nvlm_d import InternVisionConfig
from nvlm_d.modeling_intern_vit import InternAttention, InternVisionModel

SCALED = {"hidden_size": 400, "intermediate_size": 1600, "num_hidden_layers": 4}  # 25 + 7 heads of 16 channels


def build_tower(full_size: bool, device: torch.device, dtype: torch.dtype) -> InternVisionModel:
    """A tower with random weights (norms around 1) and zeroed dummy heads, decided silent by `eval()`."""
    config = InternVisionConfig(**({} if full_size else SCALED))
    with torch.device("meta"):
        tower = InternVisionModel(config)
    tower = tower.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    real = config.hidden_size
    with torch.no_grad():
        for name, param in tower.named_parameters():
            noise = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
            is_scale = name.endswith((".ls1", ".ls2")) or ("norm" in name and name.endswith(".weight"))
            param.copy_(1.0 + 0.1 * noise if is_scale else 0.02 * noise)
        for layer in tower.encoder.layers:
            attn = layer.attn
            for block in range(3):  # q, k, v rows of the dummy heads
                attn.qkv.weight[block * attn.padded_dim + real : (block + 1) * attn.padded_dim] = 0
            attn.proj.weight[:, real:] = 0
    return tower.eval()


def set_skipping(tower: InternVisionModel, skip: bool) -> None:
    for layer in tower.encoder.layers:
        layer.attn.dummy_heads_silent = skip


def timed_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def compare(tower: InternVisionModel, step: Callable[[], torch.Tensor], repeats: int, device) -> dict:
    """Median ms of `step` with every head and with the dummy heads skipped, interleaved round by round so that a
    busy machine slows both alike, and the output of each."""
    outputs, times = {}, {True: [], False: []}
    for skip in (True, False):  # warm-up, and the outputs to compare
        set_skipping(tower, skip)
        for _ in range(2):
            outputs[skip] = step()
    for _ in range(repeats):
        for skip in (True, False):
            set_skipping(tower, skip)
            times[skip].append(timed_ms(step, device))
    set_skipping(tower, True)
    return {"every head": statistics.median(times[False]), "skipped": statistics.median(times[True]), **outputs}


def inference_step(tower: InternVisionModel, pixel_values: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.no_grad():
            return tower(pixel_values).last_hidden_state.float()

    return step


def train_step(tower: InternVisionModel, pixel_values: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        tower.zero_grad(set_to_none=True)
        tower(pixel_values).last_hidden_state.float().square().mean().backward()
        return tower.embeddings.patch_embedding.weight.grad.float()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="InternViT-6B as released, bf16, on CUDA")
    parser.add_argument("--tiles", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if args.full_size else "cpu")
    dtype = torch.bfloat16 if args.full_size else torch.float32

    tower = build_tower(args.full_size, device, dtype)
    if tower.detect_silent_dummy_heads() != len(tower.encoder.layers):
        raise RuntimeError("the zeroed dummy heads were not detected as silent")
    config = tower.config
    pixel_values = torch.randn(
        args.tiles, 3, 448, 448, generator=torch.Generator().manual_seed(0), dtype=torch.float32
    ).to(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {name}, {dtype}; tower width {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} + {config.num_dummy_heads} heads of "
        f"{config.head_dim}; {args.tiles} tiles; median of {args.repeats}"
    )
    print(
        f"{'':<12}{'every head (ms)':>16}{'skipped (ms)':>14}{'ratio':>7}"
        f"{'skipped vs every head':>23}{'vs eager: every head, skipped':>31}"
    )
    eager = compare(tower, inference_step(tower, pixel_values), args.repeats, device)
    print_row("eager", eager, eager)
    tower.train()
    with previous_rule():
        print_row("train step", compare(tower, train_step(tower, pixel_values), args.repeats, device))
    tower.eval()
    if not args.no_compile:
        for layer in tower.encoder.layers:
            layer.compile()
        print_row("compiled", compare(tower, inference_step(tower, pixel_values), args.repeats, device), eager)


@contextmanager
def previous_rule():
    """The previous design's rule, for the train step: skip whenever the dummy heads were found silent."""
    current = InternAttention._skips_dummy_heads
    InternAttention._skips_dummy_heads = lambda attn: attn.dummy_heads_silent
    try:
        yield
    finally:
        InternAttention._skips_dummy_heads = current


def print_row(mode: str, result: dict, eager: dict | None = None) -> None:
    row = (
        f"{mode:<12}{result['every head']:>16.1f}{result['skipped']:>14.1f}"
        f"{result['every head'] / result['skipped']:>7.2f}{relative_difference(result[True], result[False]):>23.1e}"
    )
    if eager is not None:
        every, skipped = (relative_difference(result[skip], eager[skip]) for skip in (False, True))
        row += f"{every:>22.1e}, {skipped:.1e}"
    print(row)


if __name__ == "__main__":
    main()
