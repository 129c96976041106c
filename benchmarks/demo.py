"""Wall time of the demo (``python main.py`` with no argument) from a clean folder.

    python -m benchmarks.demo --runs 3

Each run starts in a new temporary directory, so it generates the data and trains the SegNet
and the observer from scratch, exactly as a first-time user's run does.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Spread

MAIN = Path(__file__).resolve().parent.parent / "main.py"


def one_run() -> float:
    """Seconds of one demo run in a fresh folder; raises with its output if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(MAIN)], cwd=tmp, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"demo failed (exit {done.returncode}):\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    return seconds


def run(runs: int = 3) -> Spread:
    """Spread of the demo's wall time over ``runs`` runs."""
    return Spread.of(one_run() for _ in range(runs))


def main() -> None:
    """Print the median wall time."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    print(f"demo wall time: {run(p.parse_args().runs).text()} s")


if __name__ == "__main__":
    main()
