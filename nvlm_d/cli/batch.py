"""`nvlm-d batch`: a JSONL file of requests, answered resumably and crash-safely (`nvlm_d.batch_inference`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..batch_inference import (
    BatchProgress,
    BatchRequest,
    BatchSettings,
    RequestFileError,
    ResultLog,
    ResultLogError,
    answer_requests,
    read_requests,
    record_errors,
)
from ..batch_inference.engine import DEFAULT_BATCH_SIZE, DEFAULT_PREFETCH
from ..batch_inference.planning import GROUP_BATCHES
from .common import (
    DEFAULT_MAX_NEW_TOKENS,
    PROG,
    CLIError,
    add_max_num,
    add_placement_options,
    load_model,
    model_option,
    non_negative_int,
    positive_int,
    resolve_placement,
    say,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "batch",
        help="answer a JSONL file of requests, resumably and crash-safely",
        description=(
            "Answer every request of --input (one JSON object a line: id, question, optional image path or "
            "list of paths, optional generation settings, optional metadata of your own; any other key is an "
            "error, as a misspelled keyword argument is in Python) into --output, one record a line, each flushed to "
            "disk as it is made. Run again with the same --output to resume: ids already answered are skipped, "
            "a line half-written by a crash is cut off first. A bad request becomes an error record and the "
            "run goes on; error records are final unless --retry-errors is given. Exit code 1 if the output "
            "holds any error record."
        ),
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="model directory (with config.json) or Hub id")
    parser.add_argument("--input", required=True, metavar="JSONL", help="requests, one JSON object a line")
    parser.add_argument("--output", required=True, metavar="JSONL", help="answers; appended to, and resumed from")
    parser.add_argument("--retry-errors", action="store_true", help="drop earlier error records and retry them")
    parser.add_argument("--seed", type=int, default=0, help="base seed for sampled answers (per-id, so resumes agree)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="B",
        help=(
            f"answer up to B requests together (default: {DEFAULT_BATCH_SIZE}); requests are grouped by length "
            f"within windows of {GROUP_BATCHES} x B, and requests with other generation settings never share a batch"
        ),
    )
    parser.add_argument(
        "--prefetch",
        type=non_negative_int,
        default=DEFAULT_PREFETCH,
        metavar="N",
        help=(
            f"decode and tile the images of up to N batches ahead, in worker threads, while the model works "
            f"(default: {DEFAULT_PREFETCH}; 0: load on the model's thread). At most ({GROUP_BATCHES} + N) x B "
            "requests' images are in memory at once"
        ),
    )
    add_max_num(parser)
    add_placement_options(parser, DEFAULT_MAX_NEW_TOKENS)
    parser.set_defaults(handler=_run_batch)


def _run_batch(args: argparse.Namespace) -> int:
    input_path, output_path = Path(args.input), Path(args.output)
    if not input_path.is_file():
        raise CLIError(f"--input {args.input}: no such file")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise CLIError("--output must not be the --input file")
    if output_path.is_dir():
        raise CLIError(f"--output {args.output}: is a directory")
    settings = BatchSettings(
        max_num=args.max_num,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        prefetch=args.prefetch,
        seed=args.seed,
    )
    source = model_option(args.model)
    try:
        requests = read_requests(input_path, name=f"--input {input_path}")
    except RequestFileError as exc:
        raise CLIError(str(exc)) from None
    placement = resolve_placement(args)

    try:
        log = ResultLog(output_path, name=f"--output {output_path}")
    except ResultLogError as exc:
        raise CLIError(str(exc)) from None
    try:
        if log.repaired_bytes:
            say(f"{PROG} batch: cut a half-written last record ({log.repaired_bytes} bytes) from {output_path}")
        if args.retry_errors:
            try:
                dropped = log.drop_errors()
            except ResultLogError as exc:  # the rewritten file could not be opened and locked again
                raise CLIError(str(exc)) from None
            if dropped:
                say(f"{PROG} batch: retrying {dropped} request(s) that had failed")
        todo = log.pending(requests)
        say(
            f"{PROG} batch: {len(requests)} request(s) in {input_path}, {len(requests) - len(todo)} already in "
            f"{output_path}, {len(todo)} to do"
        )
        if any(request.error is None for request in todo):
            started = time.perf_counter()
            model, tokenizer = load_model(source, placement, args.gpus)
            say(
                f"{PROG} batch: loaded {source.path} in {time.perf_counter() - started:.1f} s ({placement.description})"
            )
            _answer_with_progress_bar(todo, log, model, tokenizer, settings)
        else:
            record_errors(todo, log)
        say(f"{PROG} batch: {output_path} holds {log.answered} answer(s) and {log.errors} error record(s)")
        return 1 if log.errors else 0
    finally:
        log.close()


def _answer_with_progress_bar(
    todo: list[BatchRequest], log: ResultLog, model: Any, tokenizer: Any, settings: BatchSettings
) -> None:
    """`answer_requests` under a tqdm bar on stderr: records written, answer tokens/s, the log's error records."""
    from tqdm.auto import tqdm

    with tqdm(total=len(todo), file=sys.stderr, unit="req", desc="batch", dynamic_ncols=True) as bar:
        shown_seconds = [0.0]  # model time when the postfix was last set: it changes once per batch

        def show(progress: BatchProgress) -> None:
            bar.update(progress.records - bar.n)
            if progress.model_seconds != shown_seconds[0]:
                shown_seconds[0] = progress.model_seconds
                bar.set_postfix_str(f"{progress.tokens_per_second:.1f} tok/s, errors {log.errors}")

        answer_requests(todo, log, model, tokenizer, settings, on_progress=show)
