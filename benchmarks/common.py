"""Timing and memory helpers shared by the benchmark scripts (never used by unit tests)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

# Shared with `seqloss bench` (the package's own quick table): one code for labels and interleaved timing.
from seqloss.workbench.bench import distinct_per_row, interleaved_median_ms, zipf_labels  # noqa: F401


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PeakRSS:
    """Resident-set high-water mark above the current resident set, from a reset point (Linux).

    Writing 5 to /proc/self/clear_refs resets VmHWM, so transients from building the inputs
    (which ``ru_maxrss`` would keep forever) do not hide the peak of the measured step.
    """

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.extra_bytes = (_status_kib("VmHWM") - self.base) * 1024


# glibc's malloc keeps freed heap memory resident and raises its mmap threshold as large blocks come
# and go, so the resident set after a warm-up step would hold that step's freed tensors. With a fixed
# threshold every block of 64 KiB or more is its own map, returned at free: the resident set follows
# the live tensors (for a measurement that spans several steps).
LIVE_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def peak_extra_in_fresh_process(script: str, args: list[str], env: dict[str, str] = None) -> dict:
    """Run ``script --measure-memory ARGS`` in a new interpreter (``env`` added to its environment);
    it prints one JSON line."""
    out = subprocess.run([sys.executable, script, "--measure-memory", *args], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def parser(doc: str, cases_flag: str, cases_default: str, repeats: int) -> argparse.ArgumentParser:
    """The command line every benchmark script shares; ``cases_flag`` names its list of cases."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(cases_flag, default=cases_default, help="comma-separated cases (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--only", default="", help="comma-separated objective prefixes to run")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--measure-memory", nargs=2, metavar=("PROVIDER", "CASE"), help=argparse.SUPPRESS)
    return p


def publish(header: str, rows: list[dict], markdown: str = None) -> None:
    """Print the table under its header and, if asked, write both to a markdown file."""
    text = header + "\n\n" + table(rows, list(rows[0]))
    print(text)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text + "\n")
