"""`nvlm-d serve`: vLLM's OpenAI-compatible server, launched with the layout and limits NVLM-D needs.

The package does not serve models itself: vLLM implements NVLM-D (its own model code, tensor and pipeline
parallelism, Ray across machines) and reads the model directories this package writes unchanged. This command
builds the vLLM command line for a model directory or Hub id and replaces itself with it (`exec`, so the server's
pid is this command's pid and a signal to it reaches vLLM). What it decides, and why:

- tensor parallelism within a machine, pipeline parallelism across machines (vLLM's advice for a model that
  outgrows one node); tensor-parallel sizes must split the decoder's query and key-value heads (NVLM-D-72B: 64
  and 8, so 1, 2, 4 or 8 GPUs a node) and the vision tower's heads, dummy heads included (25 + 7 = 32);
- the vision tiling limit: vLLM takes `max_dynamic_patch` from the config (6 for NVLM-D-72B) while `load_image`
  defaults to 12 tiles, so the limit is always written on the command line (`--mm-processor-kwargs`);
- the weights each GPU holds, from the model built on the meta device, checked against the GPU memory vLLM may
  use, and the KV-cache room that is left.

vLLM usually lives in its own environment (it pins its own torch and transformers): `--python` (or
NVLM_D_VLLM_PYTHON) names that interpreter. The server is started as `python -m vllm.entrypoints.openai.api_server`,
which works for vLLM's GPU and CPU builds alike (the CPU build's `vllm` console script does not start).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..memory_size import DEFAULT_GPU_MEMORY
from .common import PROG, CLIError, model_option, one_line, positive_int, say

if TYPE_CHECKING:
    from ..configuration_nvlm_d import NVLM_D_Config

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
VLLM_PYTHON_ENV = "NVLM_D_VLLM_PYTHON"
GPU_MEMORY_UTILIZATION = 0.9  # the share of each GPU vLLM may use (its default)
RAY_PORT = 6379  # the port vLLM's multi-node examples start Ray's head on


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve NVLM-D with vLLM (OpenAI-compatible API): the right vLLM command for GPUs, nodes or the CPU",
        description=(
            "Build the vLLM command that serves an NVLM-D model directory or Hub id, and run it: tensor parallel "
            "over the GPUs of a machine (--gpus), pipeline parallel over machines (--nodes, on a Ray cluster), the "
            "tile limit written out, the weights per GPU checked against the memory vLLM may use. "
            "--print-command prints the command instead of running it (vLLM need not be installed for that). "
            "Arguments after '--' go to vLLM unchanged."
        ),
    )
    parser.add_argument("--model", required=True, metavar="DIR|HUB_ID", help="a model directory or a Hub id")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpus", type=positive_int, metavar="N", help="GPUs per machine (tensor-parallel size)")
    where.add_argument("--cpu", action="store_true", help="serve on the CPU (vLLM's CPU build)")
    parser.add_argument(
        "--nodes",
        type=positive_int,
        default=1,
        metavar="M",
        help="machines, each with --gpus GPUs (pipeline-parallel size; more than 1 needs a Ray cluster)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="weights' dtype (default: auto, the config's: bfloat16 for NVLM-D-72B)",
    )
    parser.add_argument(
        "--max-model-len",
        type=positive_int,
        metavar="TOKENS",
        help="longest prompt + answer (default: vLLM's, from the config: 32768 for NVLM-D-72B)",
    )
    parser.add_argument(
        "--max-num",
        type=positive_int,
        metavar="N",
        help="at most N tiles per image, thumbnail not counted (default: the config's max_dynamic_patch, 6 for "
        "NVLM-D-72B; load_image's default is 12)",
    )
    parser.add_argument(
        "--max-images", type=positive_int, default=1, metavar="N", help="images per request at most (default: 1)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--gpu-memory",
        default=DEFAULT_GPU_MEMORY,
        metavar="SIZE",
        help=f"memory of one GPU, for the fit check (default: {DEFAULT_GPU_MEMORY}, what an 80 GB card shows to torch)",
    )
    parser.add_argument(
        "--kv-cache-memory",
        metavar="SIZE",
        help="memory for the KV cache, per GPU or on the CPU (default: vLLM's choice)",
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        help=f"the Python interpreter that has vLLM (default: ${VLLM_PYTHON_ENV}, else this one)",
    )
    parser.add_argument("--print-command", action="store_true", help="print the vLLM command, do not run it")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_ARGS", help=argparse.SUPPRESS)
    parser.set_defaults(handler=_run_serve)


# --------------------------------------------------------------------------------------------------------
# The model and its layout
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What `serve` needs to know of the model: where vLLM finds it and its config."""

    path: str  # a local directory (absolute) or a Hub id, as vLLM gets it
    config: NVLM_D_Config
    note: str | None = None  # how the config was found, when that is worth saying


def model_info(name: str) -> ModelInfo:
    """A local NVLM-D directory, or a Hub id whose config is read from the Hugging Face cache (no download).

    A Hub id that is not cached is planned with NVLM-D-72B's architecture (the package's defaults); vLLM downloads
    the model itself."""
    from ..configuration_nvlm_d import NVLM_D_Config
    from ..model_source import cached_config

    source = model_option(name, contact_hub=False)
    local = Path(source.path)
    if local.is_dir():
        return ModelInfo(str(local.resolve()), _read_config(local / "config.json", name))
    cached = cached_config(name)
    if cached is not None:
        return ModelInfo(name, _read_config(cached, name), f"config of {name} from the Hugging Face cache")
    note = f"{name} is not in the Hugging Face cache: planned with NVLM-D-72B's architecture; vLLM downloads it"
    return ModelInfo(name, NVLM_D_Config(), note)


def _read_config(path: Path, name: str) -> NVLM_D_Config:
    """The NVLM-D config in a config.json, read with the package's class (no remote code runs)."""
    from ..configuration_nvlm_d import NVLM_D_Config

    try:
        config_dict = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CLIError(f"--model {name}: cannot read {path} ({one_line(exc)})") from None
    if config_dict.get("model_type") != NVLM_D_Config.model_type:
        raise CLIError(
            f"--model {name}: not an NVLM-D model (model_type {config_dict.get('model_type')!r}, expected 'NVLM_D')"
        )
    from .common import quiet_transformers

    quiet_transformers()
    try:
        return NVLM_D_Config.from_dict(config_dict)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--model {name}: invalid NVLM-D config ({one_line(exc)})") from None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How vLLM spreads the model: tensor parallel over the GPUs of a node, pipeline parallel over nodes."""

    tensor_parallel: int
    pipeline_parallel: int


def tensor_parallel_sizes(config: NVLM_D_Config) -> list[int]:
    """The tensor-parallel sizes (up to 64) that split every head group of the model evenly: the decoder's query
    and key-value heads, and the vision tower's heads with NVLM's dummy heads (what vLLM shards)."""
    llm, vision = config.llm_config, config.vision_config
    groups = (llm.num_attention_heads, llm.num_key_value_heads, vision.num_attention_heads + vision.num_dummy_heads)
    return [size for size in range(1, 65) if all(group % size == 0 for group in groups)]


def choose_layout(config: NVLM_D_Config, gpus: int, nodes: int) -> Layout:
    """Tensor parallel over `gpus`, pipeline parallel over `nodes`; CLIError when NVLM-D cannot be split so."""
    llm, vision = config.llm_config, config.vision_config
    sizes = tensor_parallel_sizes(config)
    if gpus not in sizes:
        fitting = [size for size in sizes if size <= gpus]
        raise CLIError(
            f"--gpus {gpus}: tensor parallelism must split the decoder's {llm.num_attention_heads} query and "
            f"{llm.num_key_value_heads} key-value heads and the vision tower's "
            f"{vision.num_attention_heads + vision.num_dummy_heads} heads evenly, so the GPUs per node must be one "
            f"of {', '.join(map(str, sizes))} (e.g. --gpus {fitting[-1]})"
        )
    if nodes > llm.num_hidden_layers:
        raise CLIError(
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


@dataclasses.dataclass(frozen=True)
class ModelBytes:
    """The model's weights in bytes, grouped as pipeline stages take them."""

    first: int  # vision tower, projector, token embeddings: with the first stage, as in vLLM
    layers: list[int]  # each decoder layer
    last: int  # final norm and LM head: with the last stage
    kv_per_layer_token: int  # K and V of one token in one decoder layer

    @classmethod
    def of(cls, config: NVLM_D_Config, element_bytes: int) -> ModelBytes:
        """From the model built on the meta device (no memory, no weights), `element_bytes` a weight (2 for bf16
        and fp16, 4 for fp32), as nvlm_d.sizing counts them."""
        from ..device_map import build_meta_model
        from ..sizing import component_bytes, kv_cache_bytes_per_token

        parts = component_bytes(build_meta_model(config), "fp32")
        scale = element_bytes / 4
        first = parts.vision + parts.projector + parts.embeddings + parts.other
        return cls(
            int(first * scale),
            [int(layer * scale) for layer in parts.layers],
            int((parts.norm + parts.head) * scale),
            kv_cache_bytes_per_token(config.llm_config, element_bytes),
        )

    def per_gpu(self, layout: Layout) -> list[tuple[range, int, int]]:
        """For each pipeline stage: its decoder layers, the weight bytes on each of its GPUs, and the KV-cache bytes
        one token costs on each of them. Every tensor counts as split over the stage's tensor-parallel GPUs (the
        few replicated norm weights are negligible)."""
        stages = pipeline_stages(len(self.layers), layout.pipeline_parallel)
        result = []
        for index, layers in enumerate(stages):
            weights = sum(self.layers[layer] for layer in layers)
            weights += (self.first if index == 0 else 0) + (self.last if index == len(stages) - 1 else 0)
            kv = self.kv_per_layer_token * len(layers)
            result.append((layers, weights // layout.tensor_parallel, kv // layout.tensor_parallel))
        return result

    def fits(self, layout: Layout, usable: float) -> bool:
        return all(weights <= usable for _, weights, _ in self.per_gpu(layout))


def smallest_layout(config: NVLM_D_Config, sizes: ModelBytes, usable: float, nodes: int) -> Layout | None:
    """The fewest GPUs per node (on `nodes` nodes), else the fewest nodes of the most GPUs per node (up to 8),
    whose weights fit in `usable` bytes a GPU."""
    tensor_sizes = [size for size in tensor_parallel_sizes(config) if size <= 8]
    for size in tensor_sizes:
        if sizes.fits(Layout(size, nodes), usable):
            return Layout(size, nodes)
    for more_nodes in range(nodes + 1, min(64, config.llm_config.num_hidden_layers) + 1):
        if sizes.fits(Layout(tensor_sizes[-1], more_nodes), usable):
            return Layout(tensor_sizes[-1], more_nodes)
    return None


def check_memory(config: NVLM_D_Config, layout: Layout, dtype: str, gpu_memory: str, context: int) -> list[str]:
    """Lines describing the weights each GPU holds and the KV-cache room left; CLIError when the weights alone
    exceed what vLLM may use of a GPU."""
    from ..sizing import GIB, WEIGHT_BYTES, parse_memory, weight_dtype

    try:
        capacity = parse_memory(gpu_memory)
    except ValueError as exc:
        raise CLIError(f"--gpu-memory: {exc}") from None
    usable = capacity * GPU_MEMORY_UTILIZATION
    sizes = ModelBytes.of(config, WEIGHT_BYTES[weight_dtype(dtype)])
    stages = sizes.per_gpu(layout)
    heaviest = max(weights for _, weights, _ in stages)
    if heaviest > usable:
        better = smallest_layout(config, sizes, usable, layout.pipeline_parallel)
        advice = (
            f"use --gpus {better.tensor_parallel}"
            + (f" --nodes {better.pipeline_parallel}" if better.pipeline_parallel > 1 else "")
            if better
            else "no layout of up to 8 GPUs a node fits"
        )
        needed = math.ceil((sizes.first + sum(sizes.layers) + sizes.last) / usable)
        if better and better.tensor_parallel * better.pipeline_parallel > needed:
            splits = ", ".join(str(size) for size in tensor_parallel_sizes(config) if size <= 8)
            advice = (
                f"the weights need {needed} GPUs of {gpu_memory}, but tensor parallelism must split the heads "
                f"({splits} GPUs a node): {advice}"
            )
        raise CLIError(
            f"does not fit: about {heaviest / GIB:.1f} GiB of {dtype} weights per GPU, more than the "
            f"{usable / GIB:.1f} GiB vLLM may use of a {gpu_memory} GPU ({GPU_MEMORY_UTILIZATION:.0%}): {advice}"
        )
    tokens = min(int((usable - weights) // kv) for _, weights, kv in stages)
    lines = [
        f"weights per GPU: {', '.join(f'{weights / GIB:.1f}' for _, weights, _ in stages)} GiB "
        f"(pipeline stage{'s' if len(stages) > 1 else ''} of {', '.join(str(len(layers)) for layers, _, _ in stages)} "
        f"decoder layers, {dtype})",
        f"KV cache: room for about {tokens:,} tokens in all on {gpu_memory} GPUs at {GPU_MEMORY_UTILIZATION:.0%} "
        "use, before activations",
    ]
    if tokens < context:
        lines.append(
            f"warning: one {context:,}-token sequence needs more KV cache than that: lower --max-model-len or add GPUs"
        )
    return lines


# --------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------


def resolved_dtype(requested: str, config: NVLM_D_Config) -> str:
    """The dtype vLLM will use: `auto` is the config's (float16 and bfloat16 configs keep theirs)."""
    if requested != "auto":
        return requested
    from ..sizing import TORCH_DTYPE_NAMES

    configured = str(getattr(config, "dtype", None) or "bfloat16").removeprefix("torch.")
    return configured if configured in TORCH_DTYPE_NAMES else "bfloat16"


def build_command(python: str, model: ModelInfo, layout: Layout | None, args: argparse.Namespace) -> list[str]:
    """The vLLM server command line (argv) for these arguments; `layout` None means the CPU."""
    max_num = args.max_num or model.config.max_dynamic_patch
    command = [python, "-m", VLLM_SERVER_MODULE, "--model", model.path, "--trust-remote-code"]
    if layout is not None:
        command += ["--tensor-parallel-size", str(layout.tensor_parallel)]
        command += ["--pipeline-parallel-size", str(layout.pipeline_parallel)]
        if layout.pipeline_parallel > 1:
            command += ["--distributed-executor-backend", "ray"]
    command += ["--dtype", args.dtype]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    command += ["--limit-mm-per-prompt", json.dumps({"image": args.max_images})]
    command += ["--mm-processor-kwargs", json.dumps({"max_dynamic_patch": max_num})]
    if args.kv_cache_memory:
        command += ["--kv-cache-memory-bytes", str(_memory_bytes(args.kv_cache_memory, "--kv-cache-memory"))]
    command += ["--host", args.host, "--port", str(args.port)]
    return command + _passthrough(args.vllm_args)


def _memory_bytes(size: str, option: str) -> int:
    """Bytes from `1GiB`, `512MB` or a plain number of bytes."""
    from ..memory_size import parse_memory

    try:
        return parse_memory(int(size) if size.isdigit() else size)
    except ValueError as exc:
        raise CLIError(f"{option}: {exc}") from None


def _passthrough(vllm_args: list[str]) -> list[str]:
    if vllm_args and vllm_args[0] == "--":
        return vllm_args[1:]
    if vllm_args:
        raise CLIError(f"unrecognized arguments: {' '.join(vllm_args)} (arguments for vLLM go after '--')")
    return []


def ray_recipe(command: list[str], nodes: int) -> list[str]:
    """The steps of vLLM's multi-node recipe on a Ray cluster, for this command."""
    return [
        f"multi-node: vLLM runs on a Ray cluster of {nodes} nodes (Ray in vLLM's environment: pip install ray), "
        "the model at the same path on every node:",
        f"  head node:        ray start --head --port={RAY_PORT}",
        f"  each other node:  ray start --address=HEAD_NODE_IP:{RAY_PORT}",
        "  (set VLLM_HOST_IP to each node's own address when nodes have several; `ray status` lists the GPUs)",
        f"  then on the head node: {shlex.join(command)}",
    ]


def vllm_python(args: argparse.Namespace) -> str:
    return args.python or os.environ.get(VLLM_PYTHON_ENV) or sys.executable


def executable_path(python: str) -> str:
    """The file `python` names, found as a shell finds it: a bare name (`python3`) on PATH, a path as it is.
    `os.execv` does not search PATH, so the command is run by this path."""
    found = shutil.which(python)
    if found is None:
        where = "on PATH" if os.sep not in python else "or it is not executable"
        raise CLIError(f"the Python interpreter {python} was not found {where}: see --python or {VLLM_PYTHON_ENV}")
    return found


def check_vllm(python: str, needs_ray: bool) -> None:
    """CLIError unless `python` runs and can import vLLM (and Ray for several nodes); nothing is imported."""
    modules = ["vllm"] + (["ray"] if needs_ray else [])
    probe = "import importlib.util, sys; print(*[m for m in sys.argv[1:] if importlib.util.find_spec(m) is None])"
    try:
        found = subprocess.run([python, "-c", probe, *modules], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CLIError(f"cannot run the Python interpreter {python} ({one_line(exc)}): see --python") from None
    if found.returncode != 0:
        raise CLIError(f"the Python interpreter {python} failed: {one_line(RuntimeError(found.stderr))}")
    missing = found.stdout.split()
    if "vllm" in missing:
        raise CLIError(
            f"vLLM is not installed for {python}: install it there (pip install vllm, on a machine with GPUs) or "
            f"name an interpreter that has it with --python or {VLLM_PYTHON_ENV} (vLLM's CPU build: "
            "python tools/cached_envs.py vllm)"
        )
    if "ray" in missing:
        raise CLIError(f"several nodes need Ray in vLLM's environment: {python} -m pip install ray")


def _run_serve(args: argparse.Namespace) -> int:
    if args.cpu and args.nodes != 1:
        raise CLIError("--nodes needs --gpus: the CPU server runs on one machine")
    model = model_info(args.model)
    python = vllm_python(args)
    layout = None if args.cpu else choose_layout(model.config, args.gpus, args.nodes)
    command = build_command(python, model, layout, args)
    notes = [model.note] if model.note else []
    if layout is not None:
        notes.append(
            f"layout: tensor parallel {layout.tensor_parallel} x pipeline parallel {layout.pipeline_parallel} = "
            f"{layout.tensor_parallel * layout.pipeline_parallel} GPU(s)"
        )
        context = args.max_model_len or model.config.llm_config.max_position_embeddings
        dtype = resolved_dtype(args.dtype, model.config)
        if {"--quantization", "-q"} & set(_passthrough(args.vllm_args)):
            notes.append(f"vLLM quantizes the weights ({shlex.join(args.vllm_args[1:])}): no {dtype} memory check")
        else:
            notes += check_memory(model.config, layout, dtype, args.gpu_memory, context)
        if layout.pipeline_parallel > 1:
            notes += ray_recipe(command, layout.pipeline_parallel)
    for note in notes:
        say(f"{PROG} serve: {note}")
    if args.print_command:
        print(shlex.join(command))
        return 0
    check_vllm(python, needs_ray=layout is not None and layout.pipeline_parallel > 1)
    executable = executable_path(python)
    say(f"{PROG} serve: {shlex.join(command)}")
    sys.stdout.flush()
    try:
        os.execv(executable, command)
    except OSError as exc:
        raise CLIError(f"cannot start {executable}: {exc.strerror or one_line(exc)}") from None
    return 1  # not reached: exec replaces this process
