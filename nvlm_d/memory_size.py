"""Memory sizes as people write them (`80GiB`, `141GB`, `512MiB`): parsed without importing torch or accelerate,
so that `nvlm-d plan` checks `--gpu-memory` while it parses its arguments."""

from __future__ import annotations

import re

GIB = 1 << 30
# The memory of one GPU that `nvlm-d plan`, `nvlm-d serve` and the fine-tuning planner assume unless told: what an
# "80 GB" card shows to torch, rounded down. An H100 80GB reports a total capacity of about 79.1 GiB and an A100
# 80GB about 79.2 GiB (`torch.cuda.get_device_properties(0).total_memory`), not 80 GiB: a default of 80GiB passed
# plans that leave less than a gibibyte to spare. The CUDA context is reserved on top (sizing.CUDA_OVERHEAD_BYTES).
DEFAULT_GPU_MEMORY = "79GiB"

# Unit -> bytes. Binary units (KiB, MiB, ...) are powers of 1024, decimal ones (KB, MB, ...) powers of 1000, as
# accelerate's `convert_file_size_to_int` counts them (`max_memory`); the case of the letters does not matter.
_UNITS = {
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_memory(size: int | str) -> int:
    """Bytes from a positive int or a string such as `80GiB`, `141GB`, `1.5TB` or `512MiB` (a bare number is bytes).

    Raises:
        ValueError: not a positive size, or an unknown unit.
    """
    value = -1
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (match := _SIZE.fullmatch(size)):
        number, unit = match.groups()
        factor = _UNITS.get(unit.lower() or "b")
        if factor is not None:
            value = int(float(number) * factor)
    if value <= 0:
        raise ValueError(f"memory must be a positive size such as '80GiB' or '141GB', got {size!r}")
    return value
