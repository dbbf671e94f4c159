"""Serving NVLM-D with vLLM: the parallel layout, the memory check and the server's command line.

The package does not serve models itself: vLLM implements NVLM-D (its own model code, tensor and pipeline
parallelism, Ray across machines) and reads the model directories this package writes unchanged. This module
decides what vLLM must be told, and why:

- tensor parallelism within a machine, pipeline parallelism across machines (vLLM's advice for a model that
  outgrows one node); tensor-parallel sizes must split the decoder's query and key-value heads (NVLM-D-72B: 64
  and 8, so 1, 2, 4 or 8 GPUs a node) and the vision tower's heads, dummy heads included (25 + 7 = 32);
- the vision tiling limit: vLLM takes `max_dynamic_patch` from the config (6 for NVLM-D-72B) while `load_image`
  defaults to 12 tiles, so the limit is always written on the command line (`--mm-processor-kwargs`);
- the weights each GPU holds, sized by nvlm_d.sizing (the one sizing model) on the model built on the meta device,
  checked against the GPU memory vLLM may use, and the KV-cache room that is left.

vLLM usually lives in its own environment (it pins its own torch and transformers), so the command names an
interpreter, and the server is started as `python -m vllm.entrypoints.openai.api_server`, which works for vLLM's GPU
and CPU builds alike (the CPU build's `vllm` console script does not start). `nvlm-d serve` is a thin command over
this module. The parameters are that command's options, and errors name them as it spells them (`--gpus 6: ...`),
so that the command prints them unchanged. Importing this module costs no more than the standard library (torch and
transformers are imported when a model is sized), so the command's `--help` stays instant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .memory_size import GIB, parse_memory
from .messages import one_line
from .model_source import cached_config, resolve_model

if TYPE_CHECKING:
    from .configuration_nvlm_d import NVLM_D_Config
    from .sizing import ComponentBytes

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
VLLM_PYTHON_ENV = "NVLM_D_VLLM_PYTHON"
VLLM_DTYPES = ("auto", "bfloat16", "float16", "float32")  # vLLM's --dtype values that this package sizes
GPU_MEMORY_UTILIZATION = 0.9  # the share of each GPU vLLM may use (its default)
MAX_GPUS_PER_NODE = 8  # the largest machine a layout that fits is searched for
RAY_PORT = 6379  # the port vLLM's multi-node examples start Ray's head on


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What serving needs to know of the model: where vLLM finds it and its config."""

    path: str  # a local directory (absolute) or a Hub id, as vLLM gets it
    config: NVLM_D_Config
    note: str | None = None  # how the config was found, when that is worth saying


def served_model(name: str) -> ServedModel:
    """A local NVLM-D directory, or a Hub id whose config is read from the Hugging Face cache (no download, no
    request: vLLM downloads the model itself, and planning must work offline).

    A Hub id that is not cached is planned with NVLM-D-72B's architecture (the package's defaults).

    Raises:
        ValueError: `name` is not a model directory or a Hub id, or its config.json is unreadable, invalid or not
            NVLM-D's. The message starts with `name` (the command puts `--model` in front).
    """
    from .configuration_nvlm_d import NVLM_D_Config

    local = Path(resolve_model(name, contact_hub=False).path)
    if local.is_dir():
        return ServedModel(str(local.resolve()), _read_config(local / "config.json", name))
    cached = cached_config(name)
    if cached is not None:
        return ServedModel(name, _read_config(cached, name), f"config of {name} from the Hugging Face cache")
    note = f"{name} is not in the Hugging Face cache: planned with NVLM-D-72B's architecture; vLLM downloads it"
    return ServedModel(name, NVLM_D_Config(), note)


def _read_config(path: Path, name: str) -> NVLM_D_Config:
    """The NVLM-D config in a config.json, read with the package's class: no remote code runs, because serving
    only reads the architecture (the model's own code is vLLM's business)."""
    from .configuration_nvlm_d import NVLM_D_Config

    try:
        config_dict = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read {path} ({one_line(exc)})") from None
    if config_dict.get("model_type") != NVLM_D_Config.model_type:
        raise ValueError(
            f"{name}: not an NVLM-D model (model_type {config_dict.get('model_type')!r}, expected 'NVLM_D')"
        )
    try:
        return NVLM_D_Config.from_dict(config_dict)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: invalid NVLM-D config ({one_line(exc)})") from None


def resolved_dtype(requested: str, config: NVLM_D_Config) -> str:
    """The dtype vLLM will use for `--dtype requested`: `auto` is the config's (float16 and bfloat16 configs keep
    theirs, anything else is served in bfloat16), which is what the memory check must size.

    Raises:
        ValueError: `requested` is not one of `VLLM_DTYPES`.
    """
    _check_choice("dtype", requested, VLLM_DTYPES)
    if requested != "auto":
        return requested
    from .sizing import TORCH_DTYPE_NAMES

    configured = str(getattr(config, "dtype", None) or "bfloat16").removeprefix("torch.")
    return configured if configured in TORCH_DTYPE_NAMES else "bfloat16"


# --------------------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """How vLLM spreads the model: tensor parallel over the GPUs of a node, pipeline parallel over nodes."""

    tensor_parallel: int
    pipeline_parallel: int

    def __post_init__(self) -> None:
        _check_positive("tensor_parallel", self.tensor_parallel)
        _check_positive("pipeline_parallel", self.pipeline_parallel)

    @property
    def gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


def tensor_parallel_sizes(config: NVLM_D_Config) -> list[int]:
    """The tensor-parallel sizes (up to 64) that split every head group of the model evenly: the decoder's query
    and key-value heads, and the vision tower's heads with NVLM's dummy heads (what vLLM shards)."""
    llm, vision = config.llm_config, config.vision_config
    groups = (llm.num_attention_heads, llm.num_key_value_heads, vision.num_attention_heads + vision.num_dummy_heads)
    return [size for size in range(1, 65) if all(group % size == 0 for group in groups)]


def choose_layout(config: NVLM_D_Config, gpus: int, nodes: int) -> Layout:
    """Tensor parallel over `gpus` GPUs a node, pipeline parallel over `nodes` nodes.

    Raises:
        TypeError: `gpus` or `nodes` is not an int.
        ValueError: either is below 1, `gpus` does not split the heads (the message lists the sizes that do), or
            there are more nodes than decoder layers.
    """
    _check_positive("gpus", gpus)
    _check_positive("nodes", nodes)
    llm, vision = config.llm_config, config.vision_config
    sizes = tensor_parallel_sizes(config)
    if gpus not in sizes:
        fitting = [size for size in sizes if size <= gpus]
        raise ValueError(
            f"--gpus {gpus}: tensor parallelism must split the decoder's {llm.num_attention_heads} query and "
            f"{llm.num_key_value_heads} key-value heads and the vision tower's "
            f"{vision.num_attention_heads + vision.num_dummy_heads} heads evenly, so the GPUs per node must be one "
            f"of {', '.join(map(str, sizes))} (e.g. --gpus {fitting[-1]})"
        )
    if nodes > llm.num_hidden_layers:
        raise ValueError(
            f"--nodes {nodes}: pipeline parallelism gives each node decoder layers, and the model has only "
            f"{llm.num_hidden_layers}"
        )
    return Layout(tensor_parallel=gpus, pipeline_parallel=nodes)


def pipeline_stages(num_layers: int, stages: int) -> list[range]:
    """Decoder layers per pipeline stage: an even split, one extra layer for each of the first stages when the
    count does not divide (close to vLLM's own split, which VLLM_PP_LAYER_PARTITION overrides)."""
    base, extra = divmod(num_layers, stages)
    bounds, start = [], 0
    for stage in range(stages):
        end = start + base + (1 if stage < extra else 0)
        bounds.append(range(start, end))
        start = end
    return bounds


# --------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageLoad:
    """What each GPU of one pipeline stage holds, in bytes."""

    layers: range  # the stage's decoder layers
    weight_bytes: int  # weights on each of its GPUs
    kv_bytes_per_token: int  # the KV cache one token costs on each of its GPUs


def stage_loads(parts: ComponentBytes, kv_bytes_per_layer_token: int, layout: Layout) -> list[StageLoad]:
    """The weights and KV cache per GPU of each pipeline stage, with the model's parts (`sizing.component_bytes`)
    assigned as vLLM assigns them: the vision tower, projector and embeddings (and the rotary buffers) with the first
    stage, the final norm and LM head with the last. Every tensor counts as split over the stage's tensor-parallel
    GPUs (the few replicated norm weights are negligible)."""
    first = parts.vision + parts.projector + parts.embeddings + parts.other
    last = parts.norm + parts.head
    stages = pipeline_stages(len(parts.layers), layout.pipeline_parallel)
    loads = []
    for index, layers in enumerate(stages):
        weights = sum(parts.layers[layer] for layer in layers)
        weights += (first if index == 0 else 0) + (last if index == len(stages) - 1 else 0)
        kv = kv_bytes_per_layer_token * len(layers)
        loads.append(StageLoad(layers, weights // layout.tensor_parallel, kv // layout.tensor_parallel))
    return loads


def smallest_layout(config: NVLM_D_Config, parts: ComponentBytes, usable: float, nodes: int) -> Layout | None:
    """The fewest GPUs per node (on `nodes` nodes), else the fewest nodes of the most GPUs per node (up to
    `MAX_GPUS_PER_NODE`), whose weights fit in `usable` bytes a GPU; None when none does."""
    tensor_sizes = [size for size in tensor_parallel_sizes(config) if size <= MAX_GPUS_PER_NODE]
    candidates = [Layout(size, nodes) for size in tensor_sizes]
    candidates += [
        Layout(tensor_sizes[-1], more) for more in range(nodes + 1, min(64, config.llm_config.num_hidden_layers) + 1)
    ]
    for layout in candidates:
        if all(stage.weight_bytes <= usable for stage in stage_loads(parts, 0, layout)):
            return layout
    return None


def check_memory(config: NVLM_D_Config, layout: Layout, dtype: str, gpu_memory: str | int, context: int) -> list[str]:
    """Lines describing the weights each GPU holds under `layout` and the KV-cache room left, for weights in `dtype`
    (bfloat16, float16 or float32) on GPUs of `gpu_memory` (`79GiB`, `141GB` or bytes) of which vLLM may use
    `GPU_MEMORY_UTILIZATION`; a last line warns when one `context`-token sequence does not fit in that room.

    The weights come from nvlm_d.sizing on the model built on the meta device (no weights, no GPU), so that this
    check, `nvlm-d plan` and the fine-tuning planner agree.

    Raises:
        ValueError: an unknown dtype, a bad memory size, a context below 1, or the weights alone exceed what vLLM
            may use of a GPU (the message names a layout that fits, if one does).
    """
    from . import device_map
    from .sizing import WEIGHT_BYTES, component_bytes, kv_cache_bytes_per_token, weight_dtype

    _check_positive("context", context)
    usable = parse_memory(gpu_memory) * GPU_MEMORY_UTILIZATION
    name = weight_dtype(dtype)
    parts = component_bytes(device_map.build_meta_model(config), name)
    stages = stage_loads(parts, kv_cache_bytes_per_token(config.llm_config, WEIGHT_BYTES[name]), layout)
    heaviest = max(stage.weight_bytes for stage in stages)
    if heaviest > usable:
        advice = _layout_advice(config, parts, usable, layout, gpu_memory)
        raise ValueError(
            f"does not fit: about {heaviest / GIB:.1f} GiB of {dtype} weights per GPU, more than the "
            f"{usable / GIB:.1f} GiB vLLM may use of a {gpu_memory} GPU ({GPU_MEMORY_UTILIZATION:.0%}): {advice}"
        )
    tokens = min(int((usable - stage.weight_bytes) // stage.kv_bytes_per_token) for stage in stages)
    lines = [
        f"weights per GPU: {', '.join(f'{stage.weight_bytes / GIB:.1f}' for stage in stages)} GiB "
        f"(pipeline stage{'s' if len(stages) > 1 else ''} of {', '.join(str(len(stage.layers)) for stage in stages)} "
        f"decoder layers, {dtype})",
        f"KV cache: room for about {tokens:,} tokens in all on {gpu_memory} GPUs at {GPU_MEMORY_UTILIZATION:.0%} "
        "use, before activations",
    ]
    if tokens < context:
        lines.append(
            f"warning: one {context:,}-token sequence needs more KV cache than that: lower --max-model-len or add GPUs"
        )
    return lines


def _layout_advice(
    config: NVLM_D_Config, parts: ComponentBytes, usable: float, layout: Layout, gpu_memory: str | int
) -> str:
    """What to use instead of a layout that does not fit; when the heads force more GPUs than the weights need
    (NVLM-D-72B in bf16 needs 3 GPUs of 79GiB, but 3 does not split the heads), it says both."""
    better = smallest_layout(config, parts, usable, layout.pipeline_parallel)
    if better is None:
        return f"no layout of up to {MAX_GPUS_PER_NODE} GPUs a node fits"
    advice = f"use --gpus {better.tensor_parallel}"
    if better.pipeline_parallel > 1:
        advice += f" --nodes {better.pipeline_parallel}"
    needed = math.ceil(parts.total / usable)
    if better.gpus > needed:
        splits = ", ".join(str(size) for size in tensor_parallel_sizes(config) if size <= MAX_GPUS_PER_NODE)
        advice = (
            f"the weights need {needed} GPUs of {gpu_memory}, but tensor parallelism must split the heads "
            f"({splits} GPUs a node): {advice}"
        )
    return advice


def vllm_quantizes(vllm_args: Sequence[str]) -> bool:
    """Whether arguments passed through to vLLM ask it to quantize (`--quantization`, `-q`): then the weights'
    size is vLLM's method's, not the dtype's, and the dtype memory check does not apply."""
    return bool({"--quantization", "-q"} & set(vllm_args))


# --------------------------------------------------------------------------------------------------------
# The command line and the interpreter
# --------------------------------------------------------------------------------------------------------


def build_command(
    python: str,
    model: ServedModel,
    layout: Layout | None,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    max_num: int | None = None,
    max_images: int = 1,
    kv_cache_bytes: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    vllm_args: Sequence[str] = (),
) -> list[str]:
    """The vLLM server's command line (argv) for `model`, run by the interpreter `python`; `layout` None means the
    CPU. `max_num` (tiles per image, thumbnail not counted) defaults to the config's `max_dynamic_patch` and is
    always written out, since vLLM's default need not be what the package's `load_image` does. `vllm_args` end the
    command unchanged.

    Raises:
        TypeError: a count that is not an int.
        ValueError: a dtype not in `VLLM_DTYPES`, or a count below 1.
    """
    _check_choice("dtype", dtype, VLLM_DTYPES)
    max_num = model.config.max_dynamic_patch if max_num is None else max_num
    for option, value in (("max_num", max_num), ("max_images", max_images), ("port", port)):
        _check_positive(option, value)
    for option, value in (("max_model_len", max_model_len), ("kv_cache_bytes", kv_cache_bytes)):
        if value is not None:
            _check_positive(option, value)
    command = [python, "-m", VLLM_SERVER_MODULE, "--model", model.path, "--trust-remote-code"]
    if layout is not None:
        command += ["--tensor-parallel-size", str(layout.tensor_parallel)]
        command += ["--pipeline-parallel-size", str(layout.pipeline_parallel)]
        if layout.pipeline_parallel > 1:
            command += ["--distributed-executor-backend", "ray"]
    command += ["--dtype", dtype]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    command += ["--limit-mm-per-prompt", json.dumps({"image": max_images})]
    command += ["--mm-processor-kwargs", json.dumps({"max_dynamic_patch": max_num})]
    if kv_cache_bytes:
        command += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    command += ["--host", host, "--port", str(port)]
    return command + list(vllm_args)


def ray_recipe(command: Sequence[str], nodes: int) -> list[str]:
    """The steps of vLLM's multi-node recipe on a Ray cluster of `nodes` nodes, ending with `command`: the package
    does not start Ray itself, since the cluster spans machines it does not run on."""
    return [
        f"multi-node: vLLM runs on a Ray cluster of {nodes} nodes (Ray in vLLM's environment: pip install ray), "
        "the model at the same path on every node:",
        f"  head node:        ray start --head --port={RAY_PORT}",
        f"  each other node:  ray start --address=HEAD_NODE_IP:{RAY_PORT}",
        "  (set VLLM_HOST_IP to each node's own address when nodes have several; `ray status` lists the GPUs)",
        f"  then on the head node: {shlex.join(command)}",
    ]


def vllm_python(requested: str | None = None) -> str:
    """The interpreter that runs vLLM: `requested`, else $NVLM_D_VLLM_PYTHON, else this one."""
    return requested or os.environ.get(VLLM_PYTHON_ENV) or sys.executable


def executable_path(python: str) -> str:
    """The file `python` names, found as a shell finds it: a bare name (`python3`) on PATH, a path as it is.
    `os.execv` does not search PATH, so the server is started by this path.

    Raises:
        ValueError: no such interpreter.
    """
    found = shutil.which(python)
    if found is None:
        where = "on PATH" if os.sep not in python else "or it is not executable"
        raise ValueError(f"the Python interpreter {python} was not found {where}: see --python or {VLLM_PYTHON_ENV}")
    return found


def check_vllm(python: str, needs_ray: bool) -> None:
    """Check that `python` runs and can import vLLM (and Ray for several nodes) before the process is replaced by
    the server, so that a missing vLLM is one clear line and not a traceback from another interpreter. Nothing is
    imported: the probe only looks the modules up.

    Raises:
        RuntimeError: `python` cannot run, fails, or lacks vLLM (or Ray).
    """
    modules = ["vllm"] + (["ray"] if needs_ray else [])
    probe = "import importlib.util, sys; print(*[m for m in sys.argv[1:] if importlib.util.find_spec(m) is None])"
    try:
        found = subprocess.run([python, "-c", probe, *modules], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run the Python interpreter {python} ({one_line(exc)}): see --python") from None
    if found.returncode != 0:
        raise RuntimeError(f"the Python interpreter {python} failed: {one_line(RuntimeError(found.stderr))}")
    missing = found.stdout.split()
    if "vllm" in missing:
        raise RuntimeError(
            f"vLLM is not installed for {python}: install it there (pip install vllm, on a machine with GPUs) or "
            f"name an interpreter that has it with --python or {VLLM_PYTHON_ENV} (vLLM's CPU build: "
            "python tools/cached_envs.py vllm)"
        )
    if "ray" in missing:
        raise RuntimeError(f"several nodes need Ray in vLLM's environment: {python} -m pip install ray")


# --------------------------------------------------------------------------------------------------------
# Checks at the boundary
# --------------------------------------------------------------------------------------------------------


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
