"""What every benchmark writes beside its numbers: machine, date, command and goals (SPEC §10).

Each benchmark imports this module whole (`from bench import report as reporting`) and builds
its report as `{**reporting.provenance(module, argv), ...numbers, "goals": [...]}`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from medoe.io import atomic_write_text

# Relative to the working directory (the repository root, as the README runs them), not to
# this file: an installed package has no docs/ beside it.
DOCS_DIR = Path("docs")
OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def command_line(module: str, argv: list[str] | None = None) -> str:
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def provenance(module: str, argv: list[str] | None = None) -> dict:
    """The machine, date and command of a run: the first keys of every report."""
    return {"machine": machine_info(), "date": now(), "command": command_line(module, argv)}


def goal(name: str, measured: float, target: float, op: str) -> dict:
    measured = round(float(measured), 4)
    return {"name": name, "measured": measured, "target": target, "op": op, "met": bool(OPS[op](measured, target))}


def header_markdown(title: str, report: dict) -> list[str]:
    m = report["machine"]
    return [
        f"# {title}",
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}`",
        f"- Machine: {m['cpu_model']}, {m['logical_cores']} logical cores, {m['platform']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"),
        "",
    ]


def goals_markdown(goals: list[dict]) -> list[str]:
    lines = ["| goal | measured | target | met |", "|---|---:|---:|---|"]
    lines += [
        f"| {g['name']} | {g['measured']} | {g['op']} {g['target']} | {'yes' if g['met'] else 'NO'} |" for g in goals
    ]
    return lines


def write_report(out_dir: Path, stem: str, report: dict, markdown_lines: list[str]) -> None:
    atomic_write_text(Path(out_dir) / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(out_dir) / f"{stem}.md", "\n".join(markdown_lines) + "\n")
