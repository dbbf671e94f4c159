"""`nvlm-d web`: a chat page in the browser (Gradio), over the model in this process or an OpenAI-compatible
server. The page is `nvlm_d.web.build_app`; this command only picks the backend and launches it."""

from __future__ import annotations

import argparse

from .common import CLIError, add_placement_options, positive_int, say

DEFAULT_PORT = 7860
WEB_MAX_NEW_TOKENS = 512
TINY_MAX_NEW_TOKENS = 32  # the demo model's answers are random tokens: short ones keep the page quick on a CPU


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "web",
        help="a chat page in the browser: images in, streamed answers out (Gradio)",
        description=(
            "Serve a chat page: upload images, see how each is tiled, ask, follow up. With no --model it serves "
            "the tiny demo model (random weights) so that it runs offline; --model serves a real checkpoint in this "
            "process; --openai-url puts the page in front of a running OpenAI-compatible server (nvlm-d serve). "
            "Needs the web extra: pip install -e '.[web]'."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR|HUB_ID", help="serve this checkpoint in-process (default: tiny demo)")
    source.add_argument(
        "--openai-url",
        metavar="URL",
        help="the base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (nvlm-d serve)",
    )
    parser.add_argument("--api-key", metavar="KEY", help="the server's API key (--openai-url)")
    parser.add_argument("--openai-model", metavar="NAME", help="the served model's name (default: the first listed)")
    parser.add_argument(
        "--timeout", type=positive_int, default=120, metavar="S", help="seconds to wait on the server (default: 120)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="N",
        help="answers generated at once; the others wait in the queue (default: 1 in-process, 8 with --openai-url)",
    )
    parser.add_argument("--max-queue", type=positive_int, default=64, metavar="N", help="waiting requests at most")
    parser.add_argument(
        "--idle-timeout",
        type=positive_int,
        default=1800,
        metavar="S",
        help="drop a browser session's conversation after S idle seconds (default: 1800)",
    )
    parser.add_argument(
        "--max-tiles",
        type=positive_int,
        default=6,
        metavar="N",
        help="default max tiles (1-12); with --openai-url, the server's own limit (nvlm-d serve --max-num)",
    )
    add_placement_options(parser, WEB_MAX_NEW_TOKENS)
    parser.set_defaults(handler=_run_web)


def _backend(args: argparse.Namespace):
    from ..web import InProcessBackend, OpenAIBackend

    if args.openai_url:
        try:
            backend = OpenAIBackend(
                args.openai_url, args.api_key, args.openai_model, timeout=args.timeout, server_max_tiles=args.max_tiles
            )
            return backend, ""
        except ValueError as exc:
            raise CLIError(f"--openai-url: {exc}") from None
    from .common import ModelSource, load_model, model_option, resolve_placement
    from .demo import tiny_checkpoint

    placement = resolve_placement(args)
    if args.model is None:
        checkpoint, _ = tiny_checkpoint()
        source = ModelSource(str(checkpoint))
        note = "The tiny demo model has random weights: its answers are gibberish. Serve a real one with --model."
    else:
        source, note = model_option(args.model), ""
    say(f"nvlm-d web: loading {source.path} on {placement.description}")
    model, tokenizer = load_model(source, placement, args.gpus)
    return InProcessBackend(model, tokenizer, name=source.path), note


def _run_web(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CLIError("the web page needs Gradio: pip install -e '.[web]'") from None
    from ..web import Settings, build_app
    from ..web.backends import MAX_TILES_RANGE

    if not MAX_TILES_RANGE[0] <= args.max_tiles <= MAX_TILES_RANGE[1]:
        raise CLIError(f"--max-tiles {args.max_tiles}: expected {MAX_TILES_RANGE[0]} to {MAX_TILES_RANGE[1]}")
    tiny = args.model is None and args.openai_url is None
    max_new_tokens = args.max_new_tokens
    if tiny and max_new_tokens == WEB_MAX_NEW_TOKENS:
        max_new_tokens = TINY_MAX_NEW_TOKENS
    backend, note = _backend(args)
    concurrency = args.concurrency or (8 if args.openai_url else 1)
    app = build_app(
        backend,
        defaults=Settings(max_tiles=args.max_tiles, max_new_tokens=max_new_tokens),
        max_new_tokens_limit=max(4096, max_new_tokens),
        concurrency=concurrency,
        max_queue=args.max_queue,
        idle_timeout=float(args.idle_timeout),
        title=f"NVLM-D chat: {backend.name}",
        note=note,
    )
    say(f"nvlm-d web: http://{args.host}:{args.port} ({backend.kind}, {concurrency} answer(s) at once)")
    app.launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True)
    return 0
