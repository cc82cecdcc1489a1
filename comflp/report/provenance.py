"""Where a result came from: code version, library versions, machine (for RESULTS.md)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = ("torch", "lhotse", "transformers", "ctranslate2", "espnet")


def git_commit(repo: Path = REPO) -> str:
    """``<hash>`` of HEAD, with ``(dirty)`` when tracked files differ; ``unknown`` outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (dirty: uncommitted changes)" if status.strip() else "")


def library_versions() -> dict[str, str]:
    """Versions of the libraries results depend on, those installed."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores this process may use, GPU (or none)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available()
        else "no GPU"
    )
    return f"{cpu_model()}, {cores} cores, {gpu}, {platform.system()} {platform.machine()}"


def provenance_lines(command: str) -> list[str]:
    """Markdown bullet lines: command, commit, versions, machine."""
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    command = (command or " ".join(sys.argv)).replace(f"{REPO}/", "")  # paths in the repo
    return [
        f"- command: `{command}`",
        f"- comflp commit: `{git_commit()}`",
        f"- versions: {versions}",
        f"- machine: {machine()}; {torch.get_num_threads()} torch threads",
    ]


def written() -> dict:
    """When and from what a results file was written: its date and the provenance lines (for
    the JSON of a study, rendered by :func:`written_lines`)."""
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "provenance": provenance_lines("")}


def written_lines(info: dict) -> list[str]:
    """Markdown lines of :func:`written`'s record."""
    return ["", f"Written on {info['date']}.", "", *info["provenance"]]
