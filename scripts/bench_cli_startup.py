"""Start-up time of the ``hf-px`` command line: ``hf-px --help`` and ``hf-px run --help``, each in a fresh process.

The top-level help builds no sub-command parser and imports neither torch nor transformers; ``run --help`` needs
the run config's dataclasses (their docstrings are its help). ``python -c "import torch"`` is timed beside them:
it is the floor of any command that needs torch. Each command runs ``--repeats`` times (after one untimed warm-up
run that fills the page cache) and the median wall time is kept; the import list of each command is recorded
from ``python -X importtime`` so the numbers can be explained.

    .venv/bin/python scripts/bench_cli_startup.py [--repeats 5] [--out results/cli_startup.json]

Writes ``results/cli_startup.json`` and prints a table. No test asserts these timings: they depend on the machine
and its load (recorded in the file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets", "hf_px.registry", "hf_px.pipeline.config")


def hf_px_command() -> list[str]:
    """The installed ``hf-px`` script of this interpreter's environment, else ``python -m hf_px``."""
    script = Path(sys.executable).parent / "hf-px"
    if script.is_file():
        return [str(script)]
    found = shutil.which("hf-px")
    return [found] if found else [sys.executable, "-m", "hf_px"]


def time_command(argv: list[str], repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` runs of ``argv`` (stdout discarded), after one untimed warm-up run."""
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return times


def heavy_imports(args: list[str]) -> list[str]:
    """Which of :data:`HEAVY` the hf-px command ``args`` imports (``python -X importtime -m hf_px ...``)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "hf_px", *args], capture_output=True,
                          text=True, check=True, cwd=ROOT)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return [name for name in HEAVY if name in imported]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command (default 5).")
    parser.add_argument("--out", default=str(ROOT / "results" / "cli_startup.json"), help="the JSON file written.")
    args = parser.parse_args()

    cli = hf_px_command()
    commands = {
        "hf-px --help": (cli + ["--help"], ["--help"]),
        "hf-px run --help": (cli + ["run", "--help"], ["run", "--help"]),
        "python -c 'import torch' (floor of any torch command)": ([sys.executable, "-c", "import torch"], None),
    }
    rows = {}
    for name, (argv, hf_px_args) in commands.items():
        times = time_command(argv, args.repeats)
        rows[name] = {"median_s": round(statistics.median(times), 3), "times_s": [round(t, 3) for t in times],
                      "imports": heavy_imports(hf_px_args) if hf_px_args is not None else ["torch"]}
        print(f"{name:<56} median {rows[name]['median_s']:.3f} s  imports: {', '.join(rows[name]['imports']) or '-'}")

    result = {
        "commands": rows,
        "repeats": args.repeats,
        "how": "fresh process per run, one untimed warm-up first; median wall time",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1m": round(os.getloadavg()[0], 2), "platform": platform.platform()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
