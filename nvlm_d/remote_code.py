"""Which of the package's modules make up the remote code of a model directory, decided in one place.

A model directory names its classes in `auto_map` (`configuration_nvlm_d.NVLM_D_Config`, ...); transformers loads
each named module and, recursively, every module it imports relatively, from the directory. So the remote code is
the modules `auto_map` names plus their relative imports, found with transformers' own
`get_relative_import_files` (the function `save_pretrained` copies files with and `from_pretrained` checks them
with). A module moved or added (a relative import more) changes this list without any other edit. The repository
root, `nvlm-d upgrade` and the tests all ask `remote_code_files()`.
"""

from __future__ import annotations

from pathlib import Path

from .configuration_nvlm_d import AUTO_MAP

PACKAGE_DIR = Path(__file__).resolve().parent

# The Auto classes of a complete model directory: the model's (`AUTO_MAP`, what `save_pretrained` writes into
# config.json) and the processor's (what `NVLM_D_Processor.save_pretrained` writes into processor_config.json).
PROCESSOR_AUTO_MAP = {
    "AutoProcessor": "processing_nvlm_d.NVLM_D_Processor",
    "AutoImageProcessor": "image_processing_nvlm_d.NVLM_D_ImageProcessor",
}
FULL_AUTO_MAP = {**AUTO_MAP, **PROCESSOR_AUTO_MAP}


def remote_code_files() -> list[str]:
    """The file names (in `nvlm_d/`) of the modules a model directory needs: those `FULL_AUTO_MAP` names and,
    recursively, the modules they import relatively. Sorted."""
    from transformers.dynamic_module_utils import get_relative_import_files

    files = set()
    for reference in FULL_AUTO_MAP.values():
        module_file = PACKAGE_DIR / f"{reference.split('.')[0]}.py"
        files.add(module_file.name)
        files.update(Path(name).name for name in get_relative_import_files(module_file))
    return sorted(files)
