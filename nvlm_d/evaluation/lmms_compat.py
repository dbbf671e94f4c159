"""Running on lmms-eval 0.7.3 as it is: two of its import- and start-time side effects that would break or silently
change an evaluation, undone where they bite. The runner and the `nvlm_d` model (which lmms-eval's own command line
builds before anything of ours runs) both call these."""

from __future__ import annotations


def skip_filelock3_patch() -> None:
    """lmms-eval 0.7.3's `simple_evaluate` first patches filelock 3's private `filelock._api` (re-entrant locks
    for `datasets`; `evaluator._enable_reentrant_filelocks`); filelock 4, which current torch and huggingface_hub
    environments carry, has no such module and the patch fails with ModuleNotFoundError. Mark the patch as applied in
    that case only. Called before `simple_evaluate` here, and by the `nvlm_d` model's constructor for lmms-eval's own
    command line (which builds the model before it applies the patch)."""
    import importlib.util

    from lmms_eval import evaluator

    if importlib.util.find_spec("filelock._api") is None:
        evaluator._enable_reentrant_filelocks._patched = True


def import_lmms_eval() -> None:
    """Import lmms-eval's task module, keeping Pillow strict about truncated images.

    On its first import, `lmms_eval.api.task` turns on `ImageFile.LOAD_TRUNCATED_IMAGES` for the whole process, after
    which a truncated benchmark image would load as a partly grey picture and silently score wrong. It stays an error
    naming the file, as `load_image` makes it everywhere else: the setting is put back once the module is loaded (a
    second import does not run that line again)."""
    from PIL import ImageFile

    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    import lmms_eval.api.task  # noqa: F401

    ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
