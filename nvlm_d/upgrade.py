"""Turn a downloaded `nvidia/NVLM-D-72B` snapshot into a model directory that works where `nvlm_d` is not installed.

NVIDIA's snapshot carries remote code written for transformers 4.39, which fails to import on transformers 5, a
CLIP `preprocessor_config.json` and Qwen2.5's chat template, neither of which is NVLM-D's. `upgrade` writes a new
directory beside it with this package's remote code (`remote_code.remote_code_files()`), NVLM-D's processor and chat
template, a `config.json` whose `auto_map` names the processor too, valid generation defaults (the model card's:
greedy, up to 1024 new tokens; the released `llm_config` says `top_p` 0, which engines reject), a model card, and the
weights as hard links to the snapshot's files (symbolic links where the file system cannot hard-link): 177 GB are
never copied, and the snapshot is only read.

Everything is checked before anything is written (`check_snapshot`, `check_output`), and the directory is assembled in
a staging directory beside the output and moved into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

from . import __version__
from .remote_code import FULL_AUTO_MAP, PACKAGE_DIR, remote_code_files

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# The model card's generation settings (`generation_config = dict(max_new_tokens=1024, do_sample=False)`).
CARD_MAX_NEW_TOKENS = 1024
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound on a header


class SnapshotError(ValueError):
    """What `upgrade` was given cannot be upgraded; the message names the file or directory at fault."""


@dataclasses.dataclass(frozen=True)
class UpgradeResult:
    """What `upgrade` wrote: the directory, its remote-code modules, and how each weight file was linked."""

    output: Path
    snapshot: Path
    code_files: list[str]
    hard_linked: list[str]
    symlinked: list[str]


def resolve_snapshot(source: str | os.PathLike, local_files_only: bool = False) -> Path:
    """A local snapshot directory, or a Hub id resolved through the Hugging Face cache first and downloaded only when
    the cache lacks it (never with `local_files_only`)."""
    path = Path(source).expanduser()
    if path.exists() or not HUB_ID.fullmatch(str(source)):
        if not path.is_dir():
            raise SnapshotError(f"{source}: no such directory" if not path.exists() else f"{source}: not a directory")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), local_files_only=True))
    except LocalEntryNotFoundError:
        if local_files_only:
            raise SnapshotError(f"{source}: not in the Hugging Face cache (first: hf download {source})") from None
    try:
        return Path(snapshot_download(str(source)))
    except Exception as exc:  # offline, unknown or gated repository, a server error
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SnapshotError(f"{source}: not in the Hugging Face cache and not downloadable ({reason})") from None


def check_snapshot(snapshot: Path) -> list[str]:
    """Check that `snapshot` is a complete NVLM-D model directory; returns its weight files (index first).

    Raises SnapshotError naming the file: no or unreadable config.json, another model's config, no weights, a
    shard the index lists that is missing, truncated or lacks a tensor the index puts there, missing tokenizer files.
    """
    config = _read_json(snapshot, CONFIG, what="not a model directory")
    model_type = config.get("model_type")
    if model_type != "NVLM_D":
        raise SnapshotError(f"{snapshot}: not an NVLM-D model ({CONFIG} says model_type {model_type!r}, not 'NVLM_D')")
    _check_tokenizer(snapshot)
    if (snapshot / INDEX).exists():
        index = _read_json(snapshot, INDEX, what="the download is incomplete")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SnapshotError(f"{snapshot / INDEX}: no weight_map")
        shards: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            shards.setdefault(shard, set()).add(tensor)
        for shard, tensors in sorted(shards.items()):
            _check_shard(snapshot, shard, tensors)
        return [INDEX, *sorted(shards)]
    if (snapshot / SINGLE_FILE).exists():
        _check_shard(snapshot, SINGLE_FILE, set())
        return [SINGLE_FILE]
    raise SnapshotError(f"{snapshot}: no weights ({INDEX} or {SINGLE_FILE}); the download is incomplete")


def _read_json(directory: Path, name: str, what: str) -> dict:
    path = directory / name
    if not path.is_file():
        raise SnapshotError(f"{path}: missing ({what})")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{path}: unreadable ({type(exc).__name__}: {exc}); the download is incomplete") from None
    if not isinstance(value, dict):
        raise SnapshotError(f"{path}: not a JSON object")
    return value


def _check_tokenizer(snapshot: Path) -> None:
    _read_json(snapshot, TOKENIZER_CONFIG, what="NVLM-D's tokenizer files are part of the snapshot")
    if not (snapshot / "tokenizer.json").is_file() and not (snapshot / "vocab.json").is_file():
        raise SnapshotError(f"{snapshot / 'tokenizer.json'}: missing (and no vocab.json/merges.txt either)")


def _check_shard(snapshot: Path, name: str, tensors: set[str]) -> None:
    """A safetensors file is complete when its size is its header's end plus the data the header describes; only the
    header is read."""
    path = snapshot / name
    if not path.is_file():
        listed = f", listed in {INDEX}" if tensors else ""
        raise SnapshotError(f"{path}: missing{listed}; the download is incomplete (download it again)")
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            if header_size > min(_HEADER_LIMIT, size - 8):
                raise ValueError("header larger than the file")
            header = json.loads(file.read(header_size))
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SnapshotError(f"{path}: not a complete safetensors file ({exc}); the download is incomplete") from None
    expected = 8 + header_size + data_end
    if size != expected:
        raise SnapshotError(f"{path}: {size} bytes, its header describes {expected}; the download is incomplete")
    absent = sorted(tensors - set(header))
    if absent:
        raise SnapshotError(f"{path}: lacks {absent[0]} (and {len(absent) - 1} more), which {INDEX} puts there")


def check_output(snapshot: Path, output: Path, force: bool) -> None:
    """Refuse to write into the snapshot (or a directory holding it), onto a file, or into a non-empty directory
    without `force`."""
    snapshot_paths = {snapshot.absolute(), snapshot.resolve()}
    output_paths = {output.absolute(), output.resolve()}
    for written in output_paths:
        for source in snapshot_paths:
            if written == source or source in written.parents:
                raise SnapshotError(f"{output}: inside the snapshot {snapshot}; the snapshot is never written to")
            if written in source.parents:
                raise SnapshotError(f"{output}: holds the snapshot {snapshot}; choose a directory beside it")
    if output.exists() and not output.is_dir():
        raise SnapshotError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise SnapshotError(f"{output}: not empty; pass --force to write into it (same-named files are replaced)")


def upgrade(
    source: str | os.PathLike, output: str | os.PathLike, force: bool = False, local_files_only: bool = False
) -> UpgradeResult:
    """Write the upgraded model directory of the snapshot `source` (a directory or a Hub id) to `output`.

    Raises SnapshotError (a ValueError) before writing anything if the snapshot or the output is not acceptable."""
    snapshot = resolve_snapshot(source, local_files_only)
    output = Path(output).expanduser()
    weights = check_snapshot(snapshot)
    check_output(snapshot, output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.upgrade-", dir=output.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the output's mode
        code_files = _write_code(staging)
        _write_config(snapshot, staging)
        _write_processor(snapshot, staging)
        hard_linked, symlinked = _link_weights(snapshot, staging, weights)
        (staging / "README.md").write_text(model_card(str(source), code_files, len(weights) - (weights[0] == INDEX)))
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return UpgradeResult(output, snapshot, code_files, hard_linked, symlinked)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_code(directory: Path) -> list[str]:
    files = remote_code_files()
    for name in files:
        shutil.copyfile(PACKAGE_DIR / name, directory / name)
    return files


def _write_config(snapshot: Path, directory: Path) -> None:
    """The snapshot's config through the package's config class (the released keys kept, `architectures` NVLM_D,
    the generation leftovers dropped), with the full `auto_map`, and the card's generation defaults."""
    from transformers import GenerationConfig

    from .configuration_nvlm_d import ARCHITECTURE, NVLM_D_Config

    config = NVLM_D_Config.from_pretrained(snapshot)
    config.architectures = [ARCHITECTURE]
    config.auto_map = dict(FULL_AUTO_MAP)
    config.save_pretrained(directory)
    llm = config.llm_config
    generation = GenerationConfig(
        bos_token_id=llm.bos_token_id,
        eos_token_id=llm.eos_token_id,
        pad_token_id=llm.pad_token_id if llm.pad_token_id is not None else llm.bos_token_id,
        do_sample=False,
        max_new_tokens=CARD_MAX_NEW_TOKENS,
    )
    generation.save_pretrained(directory)


def _write_processor(snapshot: Path, directory: Path) -> None:
    """NVLM-D's processor as the snapshot's config describes it, saved: processor_config.json, NVLM's chat template
    (chat_template.jinja) and the tokenizer files."""
    from .processing_nvlm_d import NVLM_D_Processor

    NVLM_D_Processor.from_pretrained(snapshot).save_pretrained(directory)


def _link_weights(snapshot: Path, directory: Path, names: list[str]) -> tuple[list[str], list[str]]:
    """Hard-link each weight file's real file (a Hugging Face cache snapshot holds links to blobs); symlink it where
    hard links are impossible (another file system, a file system without them)."""
    hard, symbolic = [], []
    for name in names:
        source = (snapshot / name).resolve()
        try:
            os.link(source, directory / name)
            hard.append(name)
        except OSError:
            os.symlink(source, directory / name)
            symbolic.append(name)
    return hard, symbolic


def _move_into_place(staging: Path, output: Path) -> None:
    if not output.exists():
        staging.rename(output)
        return
    for entry in sorted(staging.iterdir()):
        target = output / entry.name
        if target.is_dir() and not target.is_symlink():
            raise SnapshotError(f"{target}: a directory where upgrade writes a file")
        os.replace(entry, target)  # replaces the name, never the content of a file it links to
    staging.rmdir()


def model_card(source: str, code_files: list[str], num_shards: int) -> str:
    """The README.md of an upgraded directory: what it carries and how to load, chat with and serve it."""
    code_list = "\n".join(f"- `{name}`" for name in code_files)
    return f"""---
license: cc-by-nc-4.0
library_name: transformers
pipeline_tag: image-text-to-text
base_model: nvidia/NVLM-D-72B
tags:
- nvidia
- NVLM
- multimodal
---

# NVLM-D-72B for transformers 5

NVIDIA's [NVLM-D-72B](https://huggingface.co/nvidia/NVLM-D-72B) ({source}) with the remote code of the
`nvlm-d` package {__version__} instead of NVIDIA's, which was written for transformers 4.39 and
does not load on transformers 5. It loads with `trust_remote_code=True` alone: nothing else to install. Written by
`nvlm-d upgrade`; the weights are NVIDIA's, unchanged ({num_shards} safetensors file(s), linked to the snapshot, not
copied: keep the snapshot).

What it carries:

- remote code (this package's modules, relative imports only):
{code_list}
- `config.json`: the released architecture (`architectures: ["NVLM_D"]`), its `auto_map` naming the model, the
  processor and the image processor; `generation_config.json`: the model card's settings (greedy, up to
  {CARD_MAX_NEW_TOKENS} new tokens) instead of the released config's leftovers (`top_p` 0 is not a valid setting);
- `processor_config.json`, `chat_template.jinja` and the tokenizer files: NVLM-D's processor (up to
  `max_dynamic_patch` tiles of 448 px plus a thumbnail, 256 image tokens a tile) and NVLM's chat template (system
  message `Answer the questions.`, no newline after `<|im_end|>`), which give exactly the prompts `model.chat` builds.

## Load and chat (the model card's way)

```python
import torch
from transformers import AutoModel, AutoTokenizer

path = "path/to/this/directory"
model = AutoModel.from_pretrained(path, dtype=torch.bfloat16, low_cpu_mem_usage=True, use_flash_attn=False,
                                  device_map="auto", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
generation_config = dict(max_new_tokens=1024, do_sample=False)
response, history = model.chat(tokenizer, None, "Hello, who are you?", generation_config,
                               history=None, return_history=True)
```

Images: `load_image` from the model card (or, with the nvlm-d package, `from nvlm_d import load_image`), then

```python
pixel_values = load_image("photo.jpg", max_num=6).to(torch.bfloat16)
response = model.chat(tokenizer, pixel_values, "Describe the image.", generation_config)
```

## The transformers way

```python
from transformers import AutoProcessor, pipeline

processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": "photo.jpg"}},
                                         {{"type": "text", "text": "Describe the image."}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt").to(model.device)
new_tokens = model.generate(**inputs, max_new_tokens=64, do_sample=False)   # the new tokens only
print(processor.batch_decode(new_tokens, skip_special_tokens=True)[0])

pipe = pipeline("image-text-to-text", model=path, trust_remote_code=True)
```

## Serve it with vLLM

vLLM implements NVLM-D and reads this directory unchanged:

```bash
vllm serve path/to/this/directory --trust-remote-code --tensor-parallel-size 8 \\
    --limit-mm-per-prompt '{{"image": 1}}' --mm-processor-kwargs '{{"max_dynamic_patch": 6}}'
```

## License

The weights: NVIDIA's, under CC-BY-NC-4.0. The remote code: the nvlm-d package's, Apache-2.0.
"""
