"""`nvlm-d upgrade`: a downloaded NVLM-D-72B snapshot -> a model directory that works without the package."""

from __future__ import annotations

import argparse

from .common import CLIError, quiet_transformers, resolve_model


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "upgrade",
        help="turn a downloaded nvidia/NVLM-D-72B snapshot into a directory that loads without nvlm_d (vLLM, Hub)",
        description=(
            "Write OUTPUT: this package's remote code and processor, NVLM's chat template, config.json with the "
            "processor in its auto_map, valid generation defaults and a model card, with the snapshot's weights "
            "hard-linked (symlinked across file systems), never copied. The snapshot is checked first (an NVLM-D "
            "config, every shard complete) and never changed."
        ),
    )
    parser.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot directory, or a Hub id (cache first)")
    parser.add_argument("output", metavar="OUTPUT", help="the directory to write (new or empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUTPUT, replacing its files")
    parser.set_defaults(handler=_run_upgrade)


def _run_upgrade(args: argparse.Namespace) -> int:
    source = resolve_model(args.snapshot)
    quiet_transformers()
    from ..upgrade import SnapshotError, upgrade

    try:
        result = upgrade(source.path, args.output, force=args.force, local_files_only=source.local_files_only)
    except SnapshotError as exc:
        raise CLIError(str(exc)) from None
    links = f"{len(result.hard_linked)} file(s) hard-linked" if result.hard_linked else ""
    if result.symlinked:
        links += (", " if links else "") + f"{len(result.symlinked)} file(s) symlinked (another file system)"
    print(f"snapshot    {result.snapshot}")
    print(f"wrote       {result.output}")
    print(f"code        {', '.join(result.code_files)}")
    print(f"weights     {links} (not copied: keep the snapshot)")
    print(f"load it     AutoModel.from_pretrained({str(result.output)!r}, trust_remote_code=True)")
    return 0
