"""The vision tower with its silent dummy heads skipped against computed, side by side in one run.

NVLM pads InternViT's 25 attention heads to 32 with 7 dummy heads whose weights are zero. `InternAttention` skips
them where that is exact (their silence decided at load; eval mode without gradients, or frozen attention weights).
This runs the same tower, same weights, with that decision on and off (the per-layer `dummy_heads_silent`):

  eager      the tower as it is
  compiled   each encoder layer compiled with torch.compile (inductor). Before the decision became a plain
             attribute that torch.compile guards on, compiled code always computed every head: "every head" is
             what it ran then.

Ratios are every-head time / skipped time (above 1: skipping is faster); the features of both are compared.

    python benchmarks/bench_dummy_heads.py                  # scaled tower on the CPU (25 + 7 heads of 16, 4 layers)
    python benchmarks/bench_dummy_heads.py --full-size      # InternViT-6B as released, bf16, on the GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nvlm_d.configuration_nvlm_d import InternVisionConfig
from nvlm_d.modeling_intern_vit import InternVisionModel

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


def compare(tower: InternVisionModel, pixel_values: torch.Tensor, repeats: int) -> dict:
    """Median ms with every head and with the dummy heads skipped, interleaved round by round so that a busy
    machine slows both alike, and the features of each."""
    device = pixel_values.device
    outputs, times = {}, {True: [], False: []}
    for skip in (True, False):  # warm-up, and the features to compare
        set_skipping(tower, skip)
        for _ in range(2):
            outputs[skip] = tower(pixel_values).last_hidden_state.float()
    for _ in range(repeats):
        for skip in (True, False):
            set_skipping(tower, skip)
            times[skip].append(timed_ms(lambda: tower(pixel_values), device))
    set_skipping(tower, True)
    return {
        "every head": statistics.median(times[False]),
        "skipped": statistics.median(times[True]),
        "features": outputs,
    }


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
        f"{'':<10}{'every head (ms)':>16}{'skipped (ms)':>14}{'ratio':>7}"
        f"{'skipped vs every head':>23}{'vs eager: every head, skipped':>31}"
    )
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    eager_features = None
    with torch.no_grad():
        for mode in modes:
            if mode == "compiled":
                for layer in tower.encoder.layers:
                    layer.compile()
            result = compare(tower, pixel_values, args.repeats)
            features = result["features"]
            if eager_features is None:
                eager_features = features
            vs_eager = [relative_difference(features[skip], eager_features[skip]) for skip in (False, True)]
            print(
                f"{mode:<10}{result['every head']:>16.1f}{result['skipped']:>14.1f}"
                f"{result['every head'] / result['skipped']:>7.2f}"
                f"{relative_difference(features[True], features[False]):>23.1e}"
                f"{vs_eager[0]:>22.1e}, {vs_eager[1]:.1e}"
            )
    print("(feature columns: relative difference of the last hidden states, float32 norms)")


if __name__ == "__main__":
    main()
