"""`nvlm-d`: NVLM-D-72B from the command line.

    nvlm-d demo                                   the whole pipeline offline, on a cached tiny random model
    nvlm-d chat --model PATH [--image F] [Q]      one question, or an interactive session (stdin)
    nvlm-d tiles IMAGE [--out tiles.png]          how an image is tiled, and what it costs in tokens
    nvlm-d batch --model PATH --input R.jsonl --output A.jsonl
                                                  resumable, crash-safe batch inference
    nvlm-d plan [--gpus N] [--gpu-memory 79GiB]   how NVLM-D-72B fits on GPUs, without weights
    nvlm-d serve --model PATH --gpus N            serve it with vLLM (OpenAI-compatible), one machine or several
    nvlm-d finetune --model PATH --data D.jsonl --output DIR
                                                  fine-tune (LoRA, QLoRA, full) on one GPU or many
    nvlm-d eval --model PATH --result-save-path DIR --zero-shot-eval-tasks T ...
                                                  the model card's benchmarks (lmms-eval, NVLM's prompts)
    nvlm-d upgrade SNAPSHOT OUTPUT                a downloaded NVLM-D-72B snapshot -> a directory that needs no nvlm_d
    nvlm-d web [--model PATH | --openai-url URL]  a chat page in the browser (Gradio)

One module a command (demo, chat, tiles, batch, plan, serve, finetune, eval, upgrade, web), with what they share in
common.py. Adding a command: a module whose `add_parser(commands)` adds a subparser whose defaults set `handler`,
listed in `COMMANDS`. Handlers take the parsed arguments and return an exit code; they raise `CLIError` for bad input
(the library's `ImageInputError` counts as one), which `main` prints as one line (`nvlm-d: error: ...`) without a
traceback.

Start-up stays cheap: the command modules import at the top only the standard library and library modules that
import no torch, transformers, PIL or numpy themselves (`nvlm_d.conversation`, `nvlm_d.image_inputs`,
`nvlm_d.batch_inference`), and `import nvlm_d` imports neither torch nor transformers, so `--help`, argument errors
and the parsing of every command cost no more than the interpreter (measured in docs/cli.md). Heavy imports (torch,
transformers, PIL) happen inside the handlers; a test checks that `--help` and argument errors load none of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..image_inputs import ImageInputError
from . import batch, chat, demo, finetune, plan, serve, tiles, upgrade, web
from . import eval as evaluation
from .common import PROG, CLIError, Parser, one_line, say

# The subcommands, in the order `--help` lists them. A new command is one module more.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    demo.add_parser,
    chat.add_parser,
    tiles.add_parser,
    batch.add_parser,
    plan.add_parser,
    serve.add_parser,
    finetune.add_parser,
    evaluation.add_parser,
    upgrade.add_parser,
    web.add_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The `nvlm-d` argument parser: one subparser per entry of `COMMANDS`, each setting `handler`."""
    parser = Parser(
        prog=PROG,
        description="NVLM-D-72B (InternViT-6B + Qwen2-72B) from the command line.",
        epilog=f"Start with '{PROG} demo' (offline, no weights needed). '{PROG} COMMAND --help' describes a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nvlm-d` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except CLIError as exc:
        say(f"{PROG}: error: {exc}")
        return exc.exit_code
    except ImageInputError as exc:  # an image the user named, or its <image> markers: bad input, as a CLIError
        say(f"{PROG}: error: {exc}")
        return CLIError.exit_code
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:  # stdout closed early (`nvlm-d ... | head`)
        sys.stderr.close()
        return 141
    except Exception as exc:  # an unexpected failure: still one line, the traceback on request
        if os.environ.get("NVLM_D_DEBUG"):
            raise
        say(f"{PROG}: error: {type(exc).__name__}: {one_line(exc)} (set NVLM_D_DEBUG=1 for the traceback)")
        return 1
