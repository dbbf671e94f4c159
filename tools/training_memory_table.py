"""Print the fine-tuning memory table of docs/finetuning.md: how many 80 GB GPUs each recipe needs for NVLM-D-72B,
planned on the meta device (no weights) by nvlm_d.training.memory.

    python tools/training_memory_table.py [--gpu-memory 79GiB] [--context 4096]
"""

from __future__ import annotations

import argparse

from nvlm_d.device_map import build_meta_model
from nvlm_d.sizing import DEFAULT_GPU_MEMORY, GIB
from nvlm_d.training.memory import fewest_gpus

RECIPES = [
    ("QLoRA r=16, ViT and mlp1 frozen", "qlora", {"lora_rank": 16, "frozen": ("vision", "mlp1")}),
    ("QLoRA r=16, mlp1 trained", "qlora", {"lora_rank": 16}),
    ("LoRA r=16, mlp1 trained", "lora", {"lora_rank": 16}),
    ("LoRA r=128 on both towers, mlp1 trained", "lora", {"lora_rank": 128, "frozen": ()}),
    ("full, ViT frozen", "full", {}),
    ("full, everything trained", "full", {"frozen": ()}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory", default=DEFAULT_GPU_MEMORY)
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    model = build_meta_model()
    print(
        f"| recipe ({args.context} tokens, batch 1 per GPU, checkpointing) | trained | GPUs of {args.gpu_memory} "
        "| per GPU: states + gathered + activations -> total (GiB) |"
    )
    print("|---|---:|---:|---|")
    for label, recipe, settings in RECIPES:
        plan = fewest_gpus(recipe, args.gpu_memory, model=model, context=args.context, **settings)
        if plan is None:
            print(f"| {label} | | does not fit | |")
            continue
        gpus = f"{plan.gpus}" + (f" ({plan.gpus // 8} nodes)" if plan.gpus > 8 else "")
        terms = " + ".join(f"{b / GIB:.1f}" for b in (plan.states_bytes, plan.gathered_bytes, plan.activation_bytes))
        print(f"| {label} | {plan.trained_params / 1e9:.2f}B | {gpus} | {terms} -> {plan.total_bytes / GIB:.1f} |")


if __name__ == "__main__":
    main()
