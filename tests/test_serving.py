"""Serving with vLLM: `nvlm-d serve` builds the right vLLM command, and vLLM's own NVLM-D, loading the directory
`nvlm-d upgrade` wrote from a released-style snapshot, computes what the package computes on the snapshot itself.

The command-line tests need no vLLM. The tests marked `vllm` need vLLM's CPU build in its own environment (it pins
its own torch and transformers): set NVLM_D_VLLM_PYTHON to its interpreter (`python tools/cached_envs.py vllm`
builds it and prints the path; .ci/run does both). Each side runs in its own interpreter: vLLM writes its tokens
to JSON (tools/vllm_generate.py), and the comparison happens here. The server tests share one server on 127.0.0.1
only: one chat request, then the evaluation's `openai` backend (`nvlm-d eval`) on three hand-made ChartQA items,
answered as its `hf` backend answers them; the server is stopped by its pid.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from released_snapshot import build_released_snapshot, nvlm_d_cli
from transformers import AutoModel, AutoTokenizer

from nvlm_d import build_prompt, load_image
from nvlm_d.cli import main
from nvlm_d.configuration_nvlm_d import NVLM_D_Config
from nvlm_d.device_map import build_meta_model
from nvlm_d.modeling_nvlm_d import NVLM_D_Model
from nvlm_d.serving import Layout, ServedModel, build_command, stage_loads
from nvlm_d.sizing import component_bytes, kv_cache_bytes_per_token
from nvlm_d.web import OpenAIBackend, Settings

VLLM_PYTHON_ENV = "NVLM_D_VLLM_PYTHON"
RELEASED = "nvidia/NVLM-D-72B"
QUESTION = "Describe the image."
TEXT_QUESTION = "Hello, who are you?"
MAX_NEW_TOKENS = 12
MAX_MODEL_LEN = 4096  # the image prompt (7 tiles: 1,792 image tokens) and vLLM's profiling run fit
KV_CACHE_BYTES = 1 << 30
ENGINE_TIMEOUT_S = 1800  # outer limits: vLLM starts several processes, each importing torch, on two busy cores
HEALTH_POLL_INTERVAL_S = 2  # between health polls; a server that exits ends the pause at once
SHUTDOWN_GRACE_S = 300  # after SIGTERM, before SIGKILL: generous, so a slow but orderly shutdown is not cut
REQUEST_TIMEOUT_S = 900


# --------------------------------------------------------------------------------------------------------
# nvlm-d serve --print-command (no vLLM needed)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache: a Hub id is then planned from the package's NVLM-D-72B defaults, offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def serve(capsys, *args: str) -> tuple[int, list[str], str]:
    """Run `nvlm-d serve ARGS` in-process; returns (exit code, the printed command as argv, stderr)."""
    code = main(["serve", *args])
    captured = capsys.readouterr()
    command = shlex.split(captured.out.strip().splitlines()[-1]) if captured.out.strip() else []
    return code, command, captured.err


def option(command: list[str], name: str) -> str | None:
    """The value after `name` in an argv, or None."""
    return command[command.index(name) + 1] if name in command else None


def test_one_gpu_command_runs_vllms_openai_server_on_the_model_with_its_remote_code(capsys, tiny_checkpoint):
    code, command, _ = serve(capsys, "--model", str(tiny_checkpoint), "--gpus", "1", "--print-command")
    assert code == 0
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert option(command, "--model") == str(tiny_checkpoint.resolve())
    assert "--trust-remote-code" in command
    assert (option(command, "--tensor-parallel-size"), option(command, "--pipeline-parallel-size")) == ("1", "1")
    assert "--distributed-executor-backend" not in command


def test_nvlm_d_72b_does_not_fit_one_80gib_gpu_and_the_error_names_a_layout_that_does(capsys, no_hub_cache):
    code, command, err = serve(capsys, "--model", RELEASED, "--gpus", "1", "--print-command")
    assert (code, command) == (2, [])
    assert "does not fit: about 147.9 GiB of bfloat16 weights per GPU" in err
    assert "use --gpus 4" in err


def test_two_gpus_of_141gib_take_nvlm_d_72b_tensor_parallel(capsys, no_hub_cache):
    code, command, err = serve(capsys, "--model", RELEASED, "--gpus", "2", "--gpu-memory", "141GiB", "--print-command")
    assert code == 0
    assert (option(command, "--tensor-parallel-size"), option(command, "--pipeline-parallel-size")) == ("2", "1")
    assert "weights per GPU: 73.9 GiB" in err


@pytest.mark.parametrize("gpus", [4, 8])
def test_one_node_splits_nvlm_d_72b_tensor_parallel_over_its_gpus(capsys, no_hub_cache, gpus):
    code, command, err = serve(capsys, "--model", RELEASED, "--gpus", str(gpus), "--print-command")
    assert code == 0
    assert (option(command, "--tensor-parallel-size"), option(command, "--pipeline-parallel-size")) == (str(gpus), "1")
    assert f"weights per GPU: {147.9 / gpus:.1f} GiB" in err


def test_two_nodes_of_eight_gpus_are_tensor_parallel_within_and_pipeline_parallel_across_on_ray(capsys, repo_root):
    code, command, err = serve(capsys, "--model", str(repo_root), "--gpus", "8", "--nodes", "2", "--print-command")
    assert code == 0
    assert (option(command, "--tensor-parallel-size"), option(command, "--pipeline-parallel-size")) == ("8", "2")
    assert option(command, "--distributed-executor-backend") == "ray"
    assert "pipeline stages of 40, 40 decoder layers" in err
    assert "ray start --head --port=6379" in err
    assert "ray start --address=HEAD_NODE_IP:6379" in err


def test_planned_weights_per_gpu_add_up_to_the_model(repo_root):
    config = NVLM_D_Config.from_pretrained(repo_root)
    parts = component_bytes(build_meta_model(config), "bf16")
    kv_per_layer_token = kv_cache_bytes_per_token(config.llm_config, 2)
    (whole,) = stage_loads(parts, kv_per_layer_token, Layout(1, 1))
    split = stage_loads(parts, kv_per_layer_token, Layout(2, 4))
    assert whole.weight_bytes == parts.total
    assert sum(stage.weight_bytes for stage in split) * 2 == pytest.approx(parts.total, rel=1e-6)
    assert [len(stage.layers) for stage in split] == [20, 20, 20, 20]


@pytest.mark.parametrize("gpus", [3, 6, 16])
def test_gpu_counts_that_do_not_split_the_heads_are_refused_with_the_sizes_that_do(capsys, no_hub_cache, gpus):
    code, command, err = serve(capsys, "--model", RELEASED, "--gpus", str(gpus), "--print-command")
    assert (code, command) == (2, [])
    assert "64 query and 8 key-value heads" in err
    assert "one of 1, 2, 4, 8" in err


def test_tile_limit_is_the_configs_unless_asked_and_always_written_out(capsys, no_hub_cache):
    _, default, _ = serve(capsys, "--model", RELEASED, "--gpus", "8", "--print-command")
    _, twelve, _ = serve(capsys, "--model", RELEASED, "--gpus", "8", "--max-num", "12", "--print-command")
    assert json.loads(option(default, "--mm-processor-kwargs")) == {"max_dynamic_patch": 6}
    assert json.loads(option(twelve, "--mm-processor-kwargs")) == {"max_dynamic_patch": 12}
    assert json.loads(option(default, "--limit-mm-per-prompt")) == {"image": 1}


def test_cpu_command_has_no_parallel_layout(capsys, tiny_checkpoint):
    code, command, _ = serve(
        capsys, "--model", str(tiny_checkpoint), "--cpu", "--dtype", "float32", "--kv-cache-memory", "1GiB",
        "--print-command",
    )  # fmt: skip
    assert code == 0
    assert "--tensor-parallel-size" not in command and "--pipeline-parallel-size" not in command
    assert (option(command, "--dtype"), option(command, "--kv-cache-memory-bytes")) == ("float32", str(1 << 30))
    assert (option(command, "--host"), option(command, "--port")) == ("127.0.0.1", "8000")


def test_arguments_after_a_double_dash_go_to_vllm_unchanged(capsys, tiny_checkpoint):
    _, command, _ = serve(
        capsys, "--model", str(tiny_checkpoint), "--cpu", "--print-command", "--", "--enforce-eager", "--seed", "3"
    )
    assert command[-3:] == ["--enforce-eager", "--seed", "3"]


def test_quantization_asked_of_vllm_skips_the_bf16_memory_check(capsys, no_hub_cache):
    code, command, err = serve(capsys, "--model", RELEASED, "--gpus", "1", "--print-command", "--", "-q", "fp8")
    assert code == 0
    assert command[-2:] == ["-q", "fp8"]
    assert "no bfloat16 memory check" in err


def test_serving_without_vllm_installed_is_a_clear_error(capsys, tiny_checkpoint):
    code, command, err = serve(capsys, "--model", str(tiny_checkpoint), "--cpu", "--python", sys.executable)
    assert (code, command) == (2, [])
    assert f"vLLM is not installed for {sys.executable}" in err


def test_a_python_named_without_a_path_is_found_on_path_and_runs_the_server(tiny_checkpoint, tmp_path):
    """`--python python3` runs as a shell would run it (os.execv alone does not search PATH). The interpreter has a
    stand-in `vllm` package whose server module prints what it was started with."""
    server = tmp_path / "site" / "vllm" / "entrypoints" / "openai"
    server.mkdir(parents=True)
    for package in (server, server.parent, server.parent.parent):
        (package / "__init__.py").write_text("")
    (server / "api_server.py").write_text("import sys\nprint('stand-in vLLM server', *sys.argv[1:3])\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python-with-vllm").symlink_to(sys.executable)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    command = [sys.executable, "-m", "nvlm_d.cli", "serve", "--model", str(tiny_checkpoint), "--cpu"]
    served = subprocess.run(
        [*command, "--python", "python-with-vllm"], capture_output=True, text=True, env=env, timeout=1800
    )
    assert served.returncode == 0, served.stderr
    assert served.stdout == f"stand-in vLLM server --model {tiny_checkpoint.resolve()}\n"


def test_a_python_that_is_not_on_path_is_a_one_line_error(capsys, tiny_checkpoint):
    code, command, err = serve(capsys, "--model", str(tiny_checkpoint), "--cpu", "--python", "no-such-python-3")
    assert (code, command) == (2, [])
    assert err.strip().splitlines()[-1].startswith("nvlm-d: error: ")
    assert "no-such-python-3" in err and "Traceback" not in err


def test_nodes_on_the_cpu_are_refused(capsys, tiny_checkpoint):
    code, _, err = serve(capsys, "--model", str(tiny_checkpoint), "--cpu", "--nodes", "2", "--print-command")
    assert code == 2
    assert "--nodes needs --gpus" in err


def test_a_directory_of_another_model_is_refused(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    code, _, err = serve(capsys, "--model", str(tmp_path), "--gpus", "1", "--print-command")
    assert code == 2
    assert "not an NVLM-D model (model_type 'llava'" in err


def test_gpus_or_cpu_must_be_chosen(capsys, tiny_checkpoint):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--model", str(tiny_checkpoint), "--print-command"])
    assert exited.value.code == 2
    assert "one of the arguments --gpus --cpu is required" in capsys.readouterr().err


def test_more_nodes_than_decoder_layers_are_refused(capsys, tiny_checkpoint):
    layers = NVLM_D_Config.from_pretrained(tiny_checkpoint).llm_config.num_hidden_layers
    code, command, err = serve(
        capsys, "--model", str(tiny_checkpoint), "--gpus", "1", "--nodes", str(layers + 1), "--print-command"
    )
    assert (code, command) == (2, [])
    assert f"--nodes {layers + 1}: pipeline parallelism gives each node decoder layers, and the model has only " in err


def test_the_library_refuses_a_dtype_vllm_is_not_given_and_a_port_that_is_not_an_int():
    model = ServedModel("nvidia/NVLM-D-72B", NVLM_D_Config())
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float16, float32, got 'bf16'"):
        build_command("python3", model, Layout(8, 1), dtype="bf16")
    with pytest.raises(TypeError, match="port must be an int, got str"):
        build_command("python3", model, Layout(8, 1), port="8000")


def test_a_layout_needs_a_gpu_and_a_node():
    with pytest.raises(ValueError, match="tensor_parallel must be at least 1, got 0"):
        Layout(0, 1)


def test_a_merged_lora_fine_tune_saves_a_directory_vllm_takes_as_nvlm_d(tmp_path):
    """docs/serving.md's recipe for a LoRA fine-tune: merge the adapters, save, serve. What vLLM reads of the
    result: the released architecture name, the merged weights under the base model's names, no adapter tensors."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from nvlm_d.tiny import build_tiny_model

    base = build_tiny_model(seed=0)
    original = base.language_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    adapted.merge_and_unload().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(tmp_path / "model.safetensors")
    assert written["architectures"] == ["NVLM_D"]
    assert not [name for name in tensors if "lora" in name]
    merged = tensors["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert merged.shape == original.shape and not torch.equal(merged, original)


# --------------------------------------------------------------------------------------------------------
# Parity with vLLM's own NVLM-D (vLLM's CPU build, in its own environment)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_python() -> str:
    configured = os.environ.get(VLLM_PYTHON_ENV)
    if not configured:
        pytest.skip(
            f"needs vLLM's CPU build: export {VLLM_PYTHON_ENV}=$(python tools/cached_envs.py vllm) (.ci/run does)"
        )
    if not Path(configured).is_file():
        pytest.fail(f"{VLLM_PYTHON_ENV}={configured} is not an interpreter")
    return configured


@pytest.fixture(scope="module")
def parity_snapshot(reference_dir, tmp_path_factory) -> Path:
    """A released-style NVLM-D-72B snapshot (tests/released_snapshot.py) with tiny weights shaped for vLLM's CPU
    kernels: head_dim 64 in the decoder and the vision tower (which vLLM pads with NVLM's 7 dummy heads, as the
    package does), real 448 px tiles."""
    return build_released_snapshot(
        tmp_path_factory.mktemp("parity_snapshot") / "NVLM-D-72B",
        reference_dir,
        seed=0,
        vision_config={"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256},
        llm_config={"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512},
    )


@pytest.fixture(scope="module")
def parity_checkpoint(parity_snapshot, tmp_path_factory) -> Path:
    """What vLLM serves: the snapshot after `nvlm-d upgrade` (remote code, processor and chat template of this
    package, weights linked to the snapshot's)."""
    output = tmp_path_factory.mktemp("parity_checkpoint") / "upgraded"
    assert nvlm_d_cli("upgrade", str(parity_snapshot), str(output)) == 0
    return output


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory) -> Path:
    """A seeded 1000x600 noise image: tiled 3x2 plus a thumbnail (7 tiles) under the config's limit of 6."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(600, 1000, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("image") / "noise.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def package_side(parity_snapshot, parity_checkpoint):
    """The package's model on the unchanged snapshot (after `import nvlm_d`), and the tokenizer of the directory vLLM
    serves, whose chat template (NVLM's) vLLM's server renders requests with."""
    model = AutoModel.from_pretrained(parity_snapshot, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model) is NVLM_D_Model
    tokenizer = AutoTokenizer.from_pretrained(parity_checkpoint, trust_remote_code=True)
    return model, tokenizer


def image_request_text(tokenizer) -> str:
    """The chat prompt with the `<image>` placeholder that vLLM expands, rendered by the tokenizer's chat template
    as vLLM's server renders a chat request."""
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    return tokenizer.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def vllm_offline(vllm_python, parity_checkpoint, sample_image, package_side, repo_root, tmp_path_factory) -> dict:
    """vLLM's greedy tokens for the image prompt and the text prompt (given as the package's token ids)."""
    _, tokenizer = package_side
    work = tmp_path_factory.mktemp("vllm_offline")
    spec = {
        "model": str(parity_checkpoint),
        "max_new_tokens": MAX_NEW_TOKENS,
        "max_model_len": MAX_MODEL_LEN,
        "dtype": "float32",
        "kv_cache_bytes": KV_CACHE_BYTES,
        "requests": [
            {"name": "image", "prompt": image_request_text(tokenizer), "image": str(sample_image)},
            {"name": "text", "prompt_token_ids": tokenizer(build_prompt(TEXT_QUESTION)).input_ids},
        ],
    }
    (work / "requests.json").write_text(json.dumps(spec))
    command = [vllm_python, str(repo_root / "tools" / "vllm_generate.py"), "requests.json", "results.json"]
    log = work / "vllm.log"
    with log.open("w") as output:
        finished = subprocess.run(command, cwd=work, stdout=output, stderr=subprocess.STDOUT, timeout=ENGINE_TIMEOUT_S)
    if finished.returncode != 0:
        pytest.fail(f"vLLM failed (exit {finished.returncode}); the end of its log:\n{log.read_text()[-6000:]}")
    return json.loads((work / "results.json").read_text())


def package_greedy(package_side, prompt_ids: list[int], pixel_values) -> tuple[list[int], list[float]]:
    """The package's greedy tokens for these prompt ids, and the log-probability of each."""
    model, _ = package_side
    input_ids = torch.tensor([prompt_ids])
    output = model.generate(
        pixel_values=pixel_values,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = output.sequences[0].tolist()
    logprobs = [
        torch.log_softmax(scores[0].float(), -1)[token].item()
        for scores, token in zip(output.scores, tokens, strict=True)
    ]
    return tokens, logprobs


def tiles_of(sample_image, config) -> torch.Tensor:
    return load_image(str(sample_image), max_num=config.max_dynamic_patch)


@pytest.mark.vllm
def test_vllm_loads_an_upgraded_snapshot_as_its_own_nvlm_d(vllm_offline):
    assert vllm_offline["architectures"] == ["NVLM_D"]
    assert vllm_offline["config_class"] == "NVLM_D_Config"


@pytest.mark.vllm
def test_vllm_expands_the_image_into_the_prompt_the_package_builds(vllm_offline, package_side, sample_image):
    model, tokenizer = package_side
    prompt_ids = vllm_offline["results"]["image"]["prompt_token_ids"]
    tiles = tiles_of(sample_image, model.config).shape[0]
    assert tokenizer.decode(prompt_ids) == build_prompt(QUESTION, [tiles])
    assert prompt_ids.count(model.config.image_token_id) == tiles * model.config.num_image_token


@pytest.mark.vllm
def test_greedy_tokens_equal_vllms_for_an_image_prompt(vllm_offline, package_side, sample_image):
    vllm = vllm_offline["results"]["image"]
    tokens, _ = package_greedy(package_side, vllm["prompt_token_ids"], tiles_of(sample_image, package_side[0].config))
    assert tokens == vllm["token_ids"]


@pytest.mark.vllm
def test_greedy_tokens_equal_vllms_for_a_text_prompt(vllm_offline, package_side):
    vllm = vllm_offline["results"]["text"]
    _, tokenizer = package_side
    assert vllm["prompt_token_ids"] == tokenizer(build_prompt(TEXT_QUESTION)).input_ids
    tokens, _ = package_greedy(package_side, vllm["prompt_token_ids"], None)
    assert tokens == vllm["token_ids"]


@pytest.mark.vllm
def test_log_probabilities_of_the_greedy_tokens_agree_with_vllms(vllm_offline, package_side, sample_image):
    pixel_values = {"image": tiles_of(sample_image, package_side[0].config), "text": None}
    for name, vllm in vllm_offline["results"].items():
        _, logprobs = package_greedy(package_side, vllm["prompt_token_ids"], pixel_values[name])
        assert logprobs == pytest.approx(vllm["logprobs"], abs=1e-4), name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(server: subprocess.Popen, url: str, log: Path) -> None:
    """Poll the health endpoint until it answers 200; between polls, wait on the server's exit (an event), so a
    server that dies is reported at once with its log."""
    deadline = time.monotonic() + ENGINE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:  # refused at once until the server listens; once it listens, it may take until the deadline to answer
            with urllib.request.urlopen(url, timeout=max(1.0, deadline - time.monotonic())) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = server.wait(timeout=HEALTH_POLL_INTERVAL_S)  # the pause between polls, ended early by an exit
            pytest.fail(f"the server exited ({code}) before it was ready; its log ends:\n{log.read_text()[-6000:]}")
    pytest.fail(f"the server was not ready after {ENGINE_TIMEOUT_S} s; its log ends:\n{log.read_text()[-6000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's pid (vLLM then stops its engine processes), SIGKILL to its group if it lingers."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=SHUTDOWN_GRACE_S)  # not a limit: what a slow shutdown gets before SIGKILL
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # its own session (start_new_session), so only what it started
    server.wait(timeout=ENGINE_TIMEOUT_S)


@pytest.fixture(scope="module")
def served(vllm_python, parity_checkpoint, tmp_path_factory):
    """`nvlm-d serve --cpu` on 127.0.0.1 (the command replaces itself with vLLM's server), stopped by its pid."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "nvlm_d.cli", "serve", "--model", str(parity_checkpoint), "--cpu"]
    command += ["--python", vllm_python, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    command += ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "1GiB"]
    command += ["--", "--enforce-eager", "--seed", "0"]
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(server, f"http://127.0.0.1:{port}/health", log)
        yield f"http://127.0.0.1:{port}", server
    finally:
        stop(server)


@pytest.mark.vllm
def test_server_answers_a_chat_request_with_a_base64_image_as_the_package_does(
    served, parity_checkpoint, sample_image, vllm_offline
):
    base_url, server = served
    image_url = "data:image/png;base64," + base64.b64encode(sample_image.read_bytes()).decode()
    request = {
        "model": str(parity_checkpoint),
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": QUESTION}],
            }
        ],
        "max_tokens": MAX_NEW_TOKENS,
        "temperature": 0.0,
        "return_token_ids": True,
    }
    posted = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(posted, timeout=REQUEST_TIMEOUT_S) as response:
        answer = json.loads(response.read())
    assert server.poll() is None  # the server is the process `nvlm-d serve` started: same pid, still running
    offline = vllm_offline["results"]["image"]  # equal to the package's (test_greedy_tokens_equal_...)
    assert answer["prompt_token_ids"] == offline["prompt_token_ids"]
    assert answer["choices"][0]["token_ids"] == offline["token_ids"]


def evaluate_chartqa(data_dir: Path, result_dir: Path, repo_root: Path, **backend) -> list[dict]:
    """`nvlm-d eval --zero-shot-eval-tasks chartqa` as the CLI calls it (runner.run_evaluation) on the three
    hand-made ChartQA records (one batch); the per-sample records (raw output, cut answer, both profiles' scores).
    One task of three items keeps the CI job's added time small."""
    from nvlm_d.evaluation.runner import EvalRequest, run_evaluation

    request = EvalRequest(
        config_path=str(repo_root / "eval" / "full_eval.yaml"),
        result_save_path=str(result_dir),
        tasks=["chartqa"],
        data_dir=str(data_dir),
        batch_size=3,
        **backend,
    )
    run_evaluation(request)
    return [json.loads(line) for line in (result_dir / "samples" / "chartqa.jsonl").read_text().splitlines()]


@pytest.mark.vllm
def test_evaluations_openai_backend_on_the_server_answers_and_scores_as_its_hf_backend(
    served, parity_checkpoint, repo_root, tmp_path
):
    """The evaluation's `openai` backend against vLLM serving the model, and its `hf` backend on the same directory
    in float32 (the dtype the server runs): the same raw answers, hence the same cut answers and scores."""
    pytest.importorskip("lmms_eval", reason="the [eval] extra (lmms-eval) is not installed")
    from eval_fixtures import write_records

    base_url, server = served
    data_dir = write_records(tmp_path / "data")
    hf = evaluate_chartqa(
        data_dir, tmp_path / "hf", repo_root, model_path=str(parity_checkpoint), device="cpu", dtype="fp32"
    )
    served_answers = evaluate_chartqa(
        data_dir,
        tmp_path / "openai",
        repo_root,
        backend="openai",
        base_url=f"{base_url}/v1",
        served_model_name=str(parity_checkpoint),
    )
    assert server.poll() is None
    compared = ("doc_id", "prompt", "raw_output", "answer", "nvlm", "standard")
    assert len(hf) == len(served_answers) == 3
    assert all(record["raw_output"].strip() for record in hf)  # answers to compare, not nothing
    for ours, theirs in zip(hf, served_answers, strict=True):
        assert {key: theirs[key] for key in compared} == {key: ours[key] for key in compared}


@pytest.mark.vllm
def test_web_page_in_front_of_the_server_answers_an_image_question_as_chat_does(served, package_side, sample_image):
    """`nvlm-d web --openai-url` mode (its OpenAIBackend, as the page drives it) against vLLM serving the model:
    greedy, the answer to a question about an image equals the package's `model.chat` on the same image."""
    base_url, server = served
    model, tokenizer = package_side
    conversation = OpenAIBackend(f"{base_url}/v1", timeout=REQUEST_TIMEOUT_S).new_conversation()
    settings = Settings(max_tiles=model.config.max_dynamic_patch, max_new_tokens=MAX_NEW_TOKENS)
    *_, answer = conversation.ask(QUESTION, [str(sample_image)], settings)
    assert server.poll() is None
    expected = model.chat(
        tokenizer,
        tiles_of(sample_image, model.config),
        f"<image>\n{QUESTION}",
        {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False},
    )
    assert answer.strip() and answer == expected.strip()
