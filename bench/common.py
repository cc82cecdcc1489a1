"""What the benchmark scripts share: the GPU note of a table and printing/writing the table."""

from __future__ import annotations

from pathlib import Path

import torch

from comflp.utils import atomic_write_text


def gpu_note() -> str:
    """The line of a table's notes that names the GPU, or says there is none."""
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name()}."
    return "GPU: no GPU on this machine (torch.cuda.is_available() is False), CPU rows only."


def emit(table: str, output: Path | None) -> None:
    """Print a benchmark's Markdown table and, if asked, write it (atomically) to ``output``."""
    print(table, end="")
    if output:
        atomic_write_text(output, table)
