"""NVLM-D's two hot paths at real size on one GPU, against the device's own measured ceilings.

  vision  InternViT-6B as NVLM stores it (45 layers, width 3200, 25 + 7 dummy heads) on 7 tiles in bf16, per
          attention kernel: achieved TFLOP/s over the bf16 matrix peak measured in the same run (a large GEMM).
  decode  Qwen2-72B decoder layers at real width (8192, GQA 64/8, MLP 29568), batch 1, greedy generation with
          transformers' static KV cache (compiled by transformers on a GPU): time per layer per token against the
          HBM floor (weights + KV cache read once, over the copy bandwidth measured in the same run).

Weights are random (never zeros: they can run faster than real data). Needs about 30 GB of GPU memory.

    python benchmarks/bench_gpu.py [--decode-layers 8] [--context 1024]
    python benchmarks/bench_gpu.py --smoke      # tiny sizes on the CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nvlm_d.configuration_nvlm_d import QWEN2_72B, InternVisionConfig
from nvlm_d.modeling_intern_vit import InternVisionModel


def timed_ms(fn, device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time of `fn` in ms, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)
    return module


def matmul_peak_tflops(device: torch.device, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return 2 * size**3 / timed_ms(lambda: a @ b, device) / 1e9


def copy_bandwidth_gbps(device: torch.device, mebibytes: int) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy."""
    source = torch.randn(mebibytes * 2**18, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / timed_ms(lambda: target.copy_(source), device) / 1e6


def vision_flops(config: InternVisionConfig, tiles: int) -> float:
    """Matrix FLOPs of one forward over `tiles` tiles, dummy heads included (they are computed)."""
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    padded = (config.num_attention_heads + config.num_dummy_heads) * config.head_dim
    width, inner = config.hidden_size, config.intermediate_size
    per_layer = 2 * tokens * (width * 3 * padded + padded * width + 2 * width * inner) + 4 * tokens * tokens * padded
    patch = 2 * (tokens - 1) * config.num_channels * config.patch_size**2 * width
    return tiles * (config.num_hidden_layers * per_layer + patch)


def bench_vision(device: torch.device, config: InternVisionConfig, tiles: int, peak: float) -> list[str]:
    rows = []
    with torch.device(device):
        model = randomize_(InternVisionModel(config)).to(torch.bfloat16).eval()
    pixel_values = torch.randn(tiles, 3, config.image_size, config.image_size, device=device, dtype=torch.bfloat16)
    flops = vision_flops(config, tiles)
    for attn in ("sdpa", "eager", "flash_attention_2"):
        if attn == "flash_attention_2" and (device.type != "cuda" or not _has_flash_attn()):
            continue
        config._attn_implementation = attn
        with torch.no_grad():
            ms = timed_ms(lambda: model(pixel_values), device, repeats=5, warmup=2)
        tflops = flops / ms / 1e9
        rows.append(f"vision {attn:<18}{ms:>9.1f} ms {tflops:>8.1f} TFLOP/s {tflops / peak:>7.1%} of bf16 peak")
    return rows


def _has_flash_attn() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def bench_decode(
    device: torch.device, config: Qwen2Config, context: int, bandwidth: float, compile_decode: bool = True
) -> list[str]:
    """Per-token decode time from two greedy generations (1 and 1 + steps new tokens) with transformers' static
    cache, which transformers compiles (CUDA graphs) on a GPU."""
    with torch.device(device):
        model = randomize_(Qwen2ForCausalLM(config)).to(torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (1, context), device=device)
    steps = 32

    def generate(new_tokens: int):
        settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        settings["disable_compile"] = not compile_decode
        return model.generate(prompt, cache_implementation="static", **settings)

    with torch.no_grad():
        ms = (timed_ms(lambda: generate(1 + steps), device, 5, 2) - timed_ms(lambda: generate(1), device, 5, 2)) / steps
    layers = config.num_hidden_layers
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * config.num_key_value_heads * head_dim * (context + steps // 2) * 2
    floor_ms = layers * (layer_params * 2 + kv_bytes) / bandwidth / 1e6
    return [
        f"decode {layers} layers at context {context}: {ms:.3f} ms/token ({ms / layers:.3f} ms/layer, lm_head of "
        f"{config.vocab_size} rows included); HBM floor {floor_ms / layers:.3f} ms/layer -> {floor_ms / ms:.1%}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=7)
    parser.add_argument("--decode-layers", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script only)")
    parser.add_argument("--no-compile", action="store_true", help="decode without torch.compile (CUDA graphs)")
    args = parser.parse_args()

    vision = InternVisionConfig()
    small_vocab = {
        "vocab_size": 1024,
        "bos_token_id": None,
        "eos_token_id": None,
    }  # keeps the LM head negligible: layers are measured
    decoder = Qwen2Config(**{**QWEN2_72B, **small_vocab, "num_hidden_layers": args.decode_layers})
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        vision = InternVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        decoder = Qwen2Config(
            **{
                **QWEN2_72B,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "num_hidden_layers": 2,
                **small_vocab,
            }
        )
        args.tiles, args.context = 1, 64
    peak = matmul_peak_tflops(device, 256 if args.smoke else 8192)
    bandwidth = copy_bandwidth_gbps(device, 16 if args.smoke else 2048)
    name = "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name()
    print(f"{name}; torch {torch.__version__}; measured bf16 GEMM {peak:.0f} TFLOP/s, copy {bandwidth:.0f} GB/s")
    for row in bench_vision(device, vision, args.tiles, peak) + bench_decode(
        device, decoder, args.context, bandwidth, not args.no_compile
    ):
        print(row)


if __name__ == "__main__":
    main()
