"""Where a model named by a user lives: a local model directory, or a Hugging Face Hub id.

Every command that takes `--model` (chat, batch, demo, plan, finetune, serve) and a script that wants the same
checks before a minutes-long load ask `resolve_model`. It imports neither torch nor transformers (only
huggingface_hub, and only for a Hub id), so a typo fails at once; `read_config` imports transformers when called.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .messages import one_line

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

RELEASED_MODEL = "nvidia/NVLM-D-72B"  # NVIDIA's checkpoint on the Hub: the commands' default model

# A Hub repository id, `owner/name`, as the Hub allows them.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model directory, or a Hub id and whether to load it from the cache only."""

    path: str  # the directory as given (user's home expanded), or the Hub id
    local_files_only: bool = False
    note: str | None = None  # what the caller may want to tell the user (a fallback to the cache)


def resolve_model(name: str, contact_hub: bool = True) -> ModelSource:
    """A local model directory (it must hold config.json) or, when no such path exists, a Hub id.

    With `contact_hub`, a Hub id is checked before anything is loaded: one request to the Hub decides whether it
    exists and is reachable; without the network (or with HF_HUB_OFFLINE) a cached copy is used. Without
    `contact_hub` a Hub id is returned as it is, unchecked (for a server that downloads it itself).

    Raises:
        ValueError: a file or a directory without config.json, a name that is neither a directory nor a Hub id,
            or a Hub id that is gated, unknown, or unreachable and not cached. The message starts with `name`.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"{name}: not a model directory (no config.json in it)")
        return ModelSource(str(local))
    if local.exists():
        raise ValueError(f"{name}: is a file; expected a model directory (with config.json)")
    if not HUB_ID.fullmatch(name):
        raise ValueError(f"{name}: no such directory, and not a Hub id (owner/name)")
    return _checked_hub_model(name) if contact_hub else ModelSource(name)


def read_config(source: ModelSource) -> PreTrainedConfig:
    """The NVLM-D config of a resolved model, built by its own code (`trust_remote_code`) as `from_pretrained` would
    build it, without loading any weight: what planning needs.

    Raises:
        ValueError: the config cannot be read (the cause is chained), or it is not NVLM-D's.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            source.path, trust_remote_code=True, local_files_only=source.local_files_only
        )
    except Exception as exc:  # transformers' OSError/ValueError, or whatever the directory's own code raises
        raise ValueError(f"cannot read the config of {source.path}: {one_line(exc)}") from exc
    kind = getattr(config, "model_type", None)
    if kind != "NVLM_D":
        raise ValueError(f"{source.path} is not an NVLM-D model (model_type {kind!r})")
    return config


def cached_config(repo_id: str) -> Path | None:
    """The config.json of a Hub id in the Hugging Face cache, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    return Path(cached) if isinstance(cached, str) else None


def _checked_hub_model(repo_id: str) -> ModelSource:
    """From the cache when HF_HUB_OFFLINE is set or the Hub cannot be reached, downloaded (by transformers)
    otherwise. Without this one request, an unreachable Hub costs huggingface_hub's retries (about 23 s a file,
    several files) before transformers reports it."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached = cached_config(repo_id) is not None
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ValueError(
                f"{repo_id}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE "
                f"forbids downloading it: download it first (hf download {repo_id}) or pass a local directory"
            )
        return ModelSource(repo_id, local_files_only=True)
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        raise ValueError(
            f"{repo_id}: the repository is gated: accept its terms on huggingface.co and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{repo_id}: no such model on the Hugging Face Hub, and no such local directory "
            "(a private repository needs hf auth login)"
        ) from None
    except Exception as exc:  # no network, DNS, proxy, timeout, a server error
        reason = one_line(exc)
        if cached:
            note = f"the Hugging Face Hub is unreachable ({reason}); using the cached {repo_id}"
            return ModelSource(repo_id, local_files_only=True, note=note)
        raise ValueError(
            f"{repo_id}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}) and "
            f"the model is not in the cache ({constants.HF_HUB_CACHE}): download it where there is a network "
            f"(hf download {repo_id}) or pass a local directory"
        ) from None
    return ModelSource(repo_id)
