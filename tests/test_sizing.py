"""What the commands that size NVLM-D print: `nvlm-d plan`, `nvlm-d serve`'s memory check and the fine-tuning memory
table of docs/finetuning.md, pinned to the figures they printed before the sizing code was gathered in one module.

The pins are regressions, not oracles: a change to a figure here must be a deliberate change of the sizing model,
made in the same commit and said in its message. Every run is in-process (`main(argv)`) on the 72B model built on
the meta device: no weights, no GPU.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from nvlm_d import device_map
from nvlm_d.cli import main
from nvlm_d.configuration_nvlm_d import NVLM_D_Config
from nvlm_d.sizing import component_bytes, kv_cache_bytes_per_token, tensor_bytes
from nvlm_d.tiny import tiny_config

RELEASED = "nvidia/NVLM-D-72B"
PLAN_HEADER = "GPU  decoder layers    weights  KV cache  act.+CUDA     free  other modules"
FIRST_GPU = "vision_model, mlp1, model.embed_tokens, model.rotary_emb"
ALL_ON_ONE = f"{FIRST_GPU}, model.norm, lm_head"


def run(capsys, *args: str) -> tuple[int, str, str]:
    """`nvlm-d ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def meta_72b():
    return device_map.build_meta_model()


@pytest.fixture(autouse=True)
def one_meta_model(monkeypatch, meta_72b):
    """Every command of this module sizes the same 72B meta model, built once (building it is most of a run)."""
    build = device_map.build_meta_model

    def cached(config=None):
        return meta_72b if config is None or config.to_dict() == NVLM_D_Config().to_dict() else build(config)

    monkeypatch.setattr(device_map, "build_meta_model", cached)


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: a Hub id is planned from the package's NVLM-D-72B defaults."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------------------------
# nvlm-d plan
# --------------------------------------------------------------------------------------------------------

PLANS = {
    "defaults": (
        [],
        0,
        f"""3 GPU(s) of 79GiB:
balanced, dtype bf16, context 8192 tokens x batch 1 (GiB)
{PLAN_HEADER}
  0  0-20 (21)            49.1      0.66       4.73     24.5  {FIRST_GPU}
  1  21-50 (30)           49.0      0.94       3.10     25.9  -
  2  51-79 (29)           49.7      0.91       3.10     25.3  model.norm, lm_head
""",
    ),
    "141GB": (
        ["--gpu-memory", "141GB"],
        0,
        f"""2 GPU(s) of 141GB:
balanced, dtype bf16, context 8192 tokens x batch 1 (GiB)
{PLAN_HEADER}
  0  0-35 (36)            73.6      1.12       4.73     51.9  {FIRST_GPU}
  1  36-79 (44)           74.3      1.38       3.10     52.6  model.norm, lm_head
""",
    ),
    "int4, 7 tiles": (
        ["--dtype", "int4", "--tiles", "7"],
        0,
        f"""1 GPU(s) of 79GiB:
balanced, dtype int4, context 8192 tokens x batch 1 (GiB)
{PLAN_HEADER}
  0  0-79 (80)            49.8      2.50       3.98     22.8  {ALL_ON_ONE}
""",
    ),
    "int8 sequential": (
        ["--gpus", "4", "--dtype", "int8", "--strategy", "sequential", "--context", "4096", "--batch", "2"],
        0,
        f"""4 GPU(s) of 79GiB:
sequential, dtype int8, context 4096 tokens x batch 2 (GiB)
{PLAN_HEADER}
  0  0-66 (67)            69.5      2.09       4.73      2.7  vision_model, mlp1, model.embed_tokens
  1  67-79 (13)           12.9      0.41       3.10     62.5  model.rotary_emb, model.norm, lm_head
  2  -                     0.0      0.00       3.10     75.9  -
  3  -                     0.0      0.00       3.10     75.9  -
""",
    ),
    "one GPU does not fit": (
        ["--gpus", "1"],
        1,
        f"""1 GPU(s) of 79GiB:
balanced, dtype bf16, context 8192 tokens x batch 1 (GiB)
{PLAN_HEADER}
  0  0-79 (80)           147.9      2.50       4.73    -76.1  {ALL_ON_ONE}
does not fit: a GPU would run out of memory (negative free)
NVLM-D does not fit on 1 GPU(s) of 79GiB (bf16): it needs 3 GPUs of 79GiB
""",
    ),
    "long context, batch 4": (
        ["--gpus", "3", "--context", "32768", "--batch", "4"],
        1,
        f"""3 GPU(s) of 79GiB:
balanced, dtype bf16, context 32768 tokens x batch 4 (GiB)
{PLAN_HEADER}
  0  0-21 (22)            50.7     11.00      36.28    -19.0  {FIRST_GPU}
  1  22-51 (30)           49.0     15.00      34.66    -19.7  -
  2  52-79 (28)           48.1     14.00      34.66    -17.8  model.norm, lm_head
does not fit: a GPU would run out of memory (negative free)
NVLM-D does not fit on 3 GPU(s) of 79GiB (bf16): it needs 5 GPUs of 79GiB
""",
    ),
}


@pytest.mark.parametrize("options", PLANS, ids=list(PLANS))
def test_plan_prints_the_pinned_table(capsys, options):
    args, expected_code, expected_out = PLANS[options]
    code, out, err = run(capsys, "plan", *args)
    assert (code, out) == (expected_code, expected_out), err


def test_plan_saves_the_device_map_it_prints(capsys, tmp_path):
    saved = tmp_path / "map.json"
    code, out, _ = run(capsys, "plan", "--gpu-memory", "141GB", "--save", str(saved))
    assert code == 0 and out.endswith(f"device map written to {saved}\n")
    device_map = json.loads(saved.read_text())
    layer = re.compile(r"language_model\.model\.layers\.\d+")
    layers = [device for name, device in device_map.items() if layer.fullmatch(name)]
    assert layers == [0] * 36 + [1] * 44  # as the table says: 0-35 on GPU 0, 36-79 on GPU 1
    assert device_map["vision_model"] == 0 and device_map["language_model.lm_head"] == 1


# --------------------------------------------------------------------------------------------------------
# nvlm-d serve: the memory check and the command
# --------------------------------------------------------------------------------------------------------

NOT_CACHED = (
    f"nvlm-d serve: {RELEASED} is not in the Hugging Face cache: planned with NVLM-D-72B's architecture; "
    "vLLM downloads it"
)
VLLM_TAIL = (
    "--dtype auto --limit-mm-per-prompt '{\"image\": 1}' --mm-processor-kwargs '{\"max_dynamic_patch\": 6}' "
    "--host 127.0.0.1 --port 8000"
)
SERVES = {
    "4 GPUs": (
        ["--gpus", "4"],
        [
            "nvlm-d serve: layout: tensor parallel 4 x pipeline parallel 1 = 4 GPU(s)",
            "nvlm-d serve: weights per GPU: 37.0 GiB (pipeline stage of 80 decoder layers, bfloat16)",
            "nvlm-d serve: KV cache: room for about 447,427 tokens in all on 79GiB GPUs at 90% use, before activations",
        ],
        f"--tensor-parallel-size 4 --pipeline-parallel-size 1 {VLLM_TAIL}",
    ),
    "2 GPUs of 141GiB, 8k context": (
        ["--gpus", "2", "--gpu-memory", "141GiB", "--max-model-len", "8192"],
        [
            "nvlm-d serve: layout: tensor parallel 2 x pipeline parallel 1 = 2 GPU(s)",
            "nvlm-d serve: weights per GPU: 73.9 GiB (pipeline stage of 80 decoder layers, bfloat16)",
            "nvlm-d serve: KV cache: room for about 347,157 tokens in all on 141GiB GPUs at 90% use, before "
            "activations",
        ],
        "--tensor-parallel-size 2 --pipeline-parallel-size 1 --dtype auto --max-model-len 8192 "
        "--limit-mm-per-prompt '{\"image\": 1}' --mm-processor-kwargs '{\"max_dynamic_patch\": 6}' "
        "--host 127.0.0.1 --port 8000",
    ),
    "2 nodes of 1 GPU, float16": (
        ["--gpus", "1", "--nodes", "2", "--dtype", "float16", "--gpu-memory", "141GB"],
        [
            "nvlm-d serve: layout: tensor parallel 1 x pipeline parallel 2 = 2 GPU(s)",
            "nvlm-d serve: weights per GPU: 80.1, 67.7 GiB (pipeline stages of 40, 40 decoder layers, float16)",
            "nvlm-d serve: KV cache: room for about 249,310 tokens in all on 141GB GPUs at 90% use, before activations",
        ],
        f"--tensor-parallel-size 1 --pipeline-parallel-size 2 --distributed-executor-backend ray "
        f"--dtype float16 {VLLM_TAIL[len('--dtype auto ') :]}",
    ),
}


@pytest.mark.parametrize("options", SERVES, ids=list(SERVES))
def test_serve_prints_the_pinned_memory_check_and_command(capsys, no_hub_cache, options):
    args, notes, vllm_options = SERVES[options]
    code, out, err = run(capsys, "serve", "--model", RELEASED, "--python", "python3", "--print-command", *args)
    assert code == 0, err
    assert err.splitlines()[: len(notes) + 1] == [NOT_CACHED, *notes]
    command = f"python3 -m vllm.entrypoints.openai.api_server --model {RELEASED} --trust-remote-code {vllm_options}"
    assert out == command + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--gpus", "2"],
            "nvlm-d: error: does not fit: about 73.9 GiB of bfloat16 weights per GPU, more than the 71.1 GiB vLLM may "
            "use of a 79GiB GPU (90%): the weights need 3 GPUs of 79GiB, but tensor parallelism must split the heads "
            "(1, 2, 4, 8 GPUs a node): use --gpus 4",
        ),
        (
            ["--gpus", "1", "--dtype", "float32", "--gpu-memory", "141GB"],
            "nvlm-d: error: does not fit: about 295.7 GiB of float32 weights per GPU, more than the 118.2 GiB vLLM may "
            "use of a 141GB GPU (90%): the weights need 3 GPUs of 141GB, but tensor parallelism must split the heads "
            "(1, 2, 4, 8 GPUs a node): use --gpus 4",
        ),
    ],
)
def test_serve_refuses_a_layout_that_does_not_fit_with_the_pinned_message(capsys, no_hub_cache, args, message):
    code, out, err = run(capsys, "serve", "--model", RELEASED, "--print-command", *args)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == message


# --------------------------------------------------------------------------------------------------------
# The fine-tuning memory table (tools/training_memory_table.py, docs/finetuning.md)
# --------------------------------------------------------------------------------------------------------


def docs_memory_table(repo_root) -> list[str]:
    lines = (repo_root / "docs" / "finetuning.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| recipe (4096 tokens"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


def test_the_finetuning_memory_table_is_the_one_in_the_docs(capsys, monkeypatch, repo_root):
    path = repo_root / "tools" / "training_memory_table.py"
    spec = importlib.util.spec_from_file_location("training_memory_table", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr("sys.argv", ["training_memory_table.py"])
    capsys.readouterr()
    tool.main()
    printed = capsys.readouterr().out.splitlines()
    assert printed == docs_memory_table(repo_root)
    assert printed[0].startswith("| recipe (4096 tokens, batch 1 per GPU, checkpointing) | trained | GPUs of 79GiB |")
    assert printed[2:] == [
        "| QLoRA r=16, ViT and mlp1 frozen | 0.21B | 1 | 52.9 + 0.0 + 13.8 -> 74.5 |",
        "| QLoRA r=16, mlp1 trained | | does not fit | |",
        "| LoRA r=16, mlp1 trained | 0.83B | 4 | 39.8 + 7.0 + 13.8 -> 67.7 |",
        "| LoRA r=128 on both towers, mlp1 trained | 2.62B | 4 | 46.4 + 7.0 + 16.6 -> 78.1 |",
        "| full, ViT frozen | 73.33B | 24 (3 nodes) | 46.0 + 7.0 + 13.8 -> 74.5 |",
        "| full, everything trained | 79.38B | 32 (4 nodes) | 37.0 + 7.0 + 16.6 -> 67.7 |",
    ]


# --------------------------------------------------------------------------------------------------------
# The sizing model itself
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, element_bytes", [("bf16", 2), ("float16", 2), ("fp32", 4)])
def test_the_parts_add_up_to_every_tensor_at_the_dtypes_bytes(dtype, element_bytes):
    model = device_map.build_meta_model(tiny_config())
    parts = component_bytes(model, dtype)
    elements = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    assert parts.total == elements * element_bytes
    assert parts.vision == element_bytes * sum(p.numel() for p in model.vision_model.parameters())
    layer = model.language_model.model.layers[0]
    assert parts.layers == [element_bytes * sum(p.numel() for p in layer.parameters())] * len(parts.layers)


def test_int4_packs_the_decoders_linear_weights_two_to_a_byte_and_keeps_the_rest_in_bf16():
    model = device_map.build_meta_model(tiny_config())
    linear = sum(
        module.weight.numel()
        for name, module in model.language_model.model.layers.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    everything = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    assert tensor_bytes(model, "int4")[""] == (everything - linear) * 2 + linear // 2


def test_a_qwen2_72b_token_costs_4_kib_of_kv_cache_per_layer():
    assert kv_cache_bytes_per_token(NVLM_D_Config().llm_config) == 2 * 8 * 128 * 2  # K and V, 8 heads of 128, bf16


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="int3"):
        tensor_bytes(device_map.build_meta_model(tiny_config()), "int3")


def test_plan_serve_and_the_readme_agree_on_the_gpus_nvlm_d_72b_needs_in_bf16(capsys, no_hub_cache, repo_root):
    code, out, _ = run(capsys, "plan")
    assert code == 0 and out.startswith("3 GPU(s) of 79GiB:")
    code, out, err = run(capsys, "serve", "--model", RELEASED, "--gpus", "2", "--print-command")
    assert code == 2 and "the weights need 3 GPUs of 79GiB" in err and "use --gpus 4" in err
    readme = " ".join((repo_root / "README.md").read_text().split())
    assert "bf16: three 80 GB GPUs" in readme
    assert "vLLM takes four" in readme
