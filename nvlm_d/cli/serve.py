"""`nvlm-d serve`: vLLM's OpenAI-compatible server, launched with the layout and limits NVLM-D needs.

The decisions (layout, memory check, the vLLM command line, the interpreter checks) are nvlm_d.serving's; this
command parses the options, prints what the library decided and replaces itself with the server (`exec`, so the
server's pid is this command's pid and a signal to it reaches vLLM).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from .. import serving
from ..memory_size import DEFAULT_GPU_MEMORY, parse_memory
from .common import PROG, CLIError, one_line, positive_int, quiet_transformers, say

T = TypeVar("T")


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
        choices=serving.VLLM_DTYPES,
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
        help=f"the Python interpreter that has vLLM (default: ${serving.VLLM_PYTHON_ENV}, else this one)",
    )
    parser.add_argument("--print-command", action="store_true", help="print the vLLM command, do not run it")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_ARGS", help=argparse.SUPPRESS)
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    if args.cpu and args.nodes != 1:
        raise CLIError("--nodes needs --gpus: the CPU server runs on one machine")
    quiet_transformers()
    try:
        model = serving.served_model(args.model)
    except ValueError as exc:
        raise CLIError(f"--model {exc}") from None
    python = serving.vllm_python(args.python)
    layout = None if args.cpu else _checked(serving.choose_layout, model.config, args.gpus, args.nodes)
    kv_cache_bytes = None
    if args.kv_cache_memory:
        kv_cache_memory = args.kv_cache_memory
        kv_cache_bytes = _memory_bytes(
            int(kv_cache_memory) if kv_cache_memory.isdigit() else kv_cache_memory, "--kv-cache-memory"
        )
    vllm_args = _passthrough(args.vllm_args)
    command = serving.build_command(
        python,
        model,
        layout,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num=args.max_num,
        max_images=args.max_images,
        kv_cache_bytes=kv_cache_bytes,
        host=args.host,
        port=args.port,
        vllm_args=vllm_args,
    )
    notes = [model.note] if model.note else []
    if layout is not None:
        notes.append(
            f"layout: tensor parallel {layout.tensor_parallel} x pipeline parallel {layout.pipeline_parallel} = "
            f"{layout.gpus} GPU(s)"
        )
        dtype = serving.resolved_dtype(args.dtype, model.config)
        if serving.vllm_quantizes(vllm_args):
            notes.append(f"vLLM quantizes the weights ({shlex.join(vllm_args)}): no {dtype} memory check")
        else:
            _memory_bytes(args.gpu_memory, "--gpu-memory")  # checked here, so that its error names the option
            context = args.max_model_len or model.config.llm_config.max_position_embeddings
            notes += _checked(serving.check_memory, model.config, layout, dtype, args.gpu_memory, context)
        if layout.pipeline_parallel > 1:
            notes += serving.ray_recipe(command, layout.pipeline_parallel)
    for note in notes:
        say(f"{PROG} serve: {note}")
    if args.print_command:
        print(shlex.join(command))
        return 0
    try:
        serving.check_vllm(python, needs_ray=layout is not None and layout.pipeline_parallel > 1)
        executable = serving.executable_path(python)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    say(f"{PROG} serve: {shlex.join(command)}")
    sys.stdout.flush()
    try:
        os.execv(executable, command)
    except OSError as exc:
        raise CLIError(f"cannot start {executable}: {exc.strerror or one_line(exc)}") from None
    return 1  # not reached: exec replaces this process


def _checked(decide: Callable[..., T], *args: Any) -> T:
    """A library decision; its refusal (ValueError) is the one-line error."""
    try:
        return decide(*args)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _memory_bytes(size: int | str, option: str) -> int:
    """Bytes from `1GiB`, `512MB` or a number of bytes; a bad size is an error naming `option`."""
    try:
        return parse_memory(size)
    except ValueError as exc:
        raise CLIError(f"{option}: {exc}") from None


def _passthrough(vllm_args: list[str]) -> list[str]:
    """The arguments after `--` (argparse's REMAINDER keeps the `--` itself); anything else left over is an error."""
    if vllm_args and vllm_args[0] == "--":
        return vllm_args[1:]
    if vllm_args:
        raise CLIError(f"unrecognized arguments: {' '.join(vllm_args)} (arguments for vLLM go after '--')")
    return []
