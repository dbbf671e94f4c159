"""NVLM's chat template for the tokenizer of NVIDIA's released snapshot, through `AutoTokenizer.from_pretrained`.

The released `tokenizer_config.json` names `Qwen2Tokenizer` and holds Qwen2.5's chat template ("You are Qwen, created
by Alibaba Cloud..."), which NVLM-D's own code never read: `apply_chat_template` on it does not give the prompt `chat`
builds. transformers 5 picks the tokenizer class from that file (no `auto_map`), so a tokenizer registered for
`NVLM_D_Config` is never asked, and the checkpoint's files must stay as they are. So after `import nvlm_d`,
`AutoTokenizer.from_pretrained` is wrapped (`nvlm_d.auto_registration` does it once transformers loads
`AutoTokenizer`): a tokenizer loaded for a model whose `config.json` says `model_type` "NVLM_D" and that carries no
chat template, or Qwen's stock one, gets NVLM's (`conversation.CHAT_TEMPLATE`). Every other model's tokenizer, and
any other template (the one a directory saved by this package carries, or one a user chose), is left as loaded.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from transformers.utils import CONFIG_NAME, cached_file, logging

from .configuration_nvlm_d import NVLM_D_Config
from .conversation import CHAT_TEMPLATE

logger = logging.get_logger(__name__)

# Qwen2.5's default system message: in its stock chat template (the released tokenizer_config.json's), in no other.
QWEN_DEFAULT_SYSTEM_MESSAGE = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# What `from_pretrained` passes on to find the model's config.json where the tokenizer was found.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def needs_nvlm_template(chat_template: Any) -> bool:
    """True for no template and for Qwen's stock one: those a tokenizer of NVLM-D carries only by inheritance."""
    return chat_template is None or (isinstance(chat_template, str) and QWEN_DEFAULT_SYSTEM_MESSAGE in chat_template)


def is_nvlm_d_model(pretrained_model_name_or_path: str | os.PathLike, config: Any = None, **kwargs) -> bool:
    """Whether the model there is NVLM-D: by the `config` given to `from_pretrained`, else by its config.json (none,
    as for a directory of tokenizer files only, or none to be read: not NVLM-D, the tokenizer is left as loaded)."""
    if config is not None:
        return getattr(config, "model_type", None) == NVLM_D_Config.model_type
    lookup = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    try:
        path = cached_file(
            pretrained_model_name_or_path,
            CONFIG_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **lookup,
        )
        if path is None:
            return False
        with open(path, encoding="utf-8") as file:
            return json.load(file).get("model_type") == NVLM_D_Config.model_type
    except (OSError, ValueError):  # a vocabulary file's path, an unreadable config.json: transformers' to report
        return False


def give_nvlm_template(tokenizer: Any, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> Any:
    """The tokenizer, with NVLM's chat template if it is NVLM-D's and carries Qwen's stock template or none."""
    if not needs_nvlm_template(getattr(tokenizer, "chat_template", None)):
        return tokenizer
    if not is_nvlm_d_model(pretrained_model_name_or_path, **kwargs):
        return tokenizer
    logger.info(
        f"{pretrained_model_name_or_path}: NVLM-D's tokenizer files carry Qwen2.5's chat template (or none), which "
        "NVLM-D never used; the tokenizer gets NVLM's (system message 'Answer the questions.'), as `chat` prompts"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def wrap_auto_tokenizer(auto_tokenizer: type) -> None:
    """Make `auto_tokenizer.from_pretrained` give NVLM-D's tokenizers NVLM's chat template (`give_nvlm_template`).

    The wrapper keeps the classmethod's name, docstring and signature (`functools.wraps`), passes every argument on
    unchanged, and is installed once however often this is called."""
    original = auto_tokenizer.__dict__["from_pretrained"].__func__
    if getattr(original, "_nvlm_d_template", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *inputs, **kwargs):
        tokenizer = original(cls, pretrained_model_name_or_path, *inputs, **kwargs)
        return give_nvlm_template(tokenizer, pretrained_model_name_or_path, **kwargs)

    from_pretrained._nvlm_d_template = True
    auto_tokenizer.from_pretrained = classmethod(from_pretrained)
