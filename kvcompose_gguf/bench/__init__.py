"""Benchmarks: commands that print JSON and write results/<name>.json.

Every report carries the same header (`report_header`): the benchmark, the exact
command, the date and the machine, so a figure can always be traced to its run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report_header(name: str, argv: list[str] | None) -> dict[str, Any]:
    args = argv if argv is not None else sys.argv[1:]
    return {
        "benchmark": name,
        "command": f"python -m kvcompose_gguf.bench.{name} " + " ".join(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "n_cpu": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
        },
    }


def write_report(report: dict[str, Any], out: str | Path) -> None:
    """Print the report as JSON and write it to `out`."""
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
