"""Every benchmark in one process run, as a markdown report (and JSON) with the targets.

    python -m benchmarks.run            # full sizes (about an hour on a 2-core CPU)
    python -m benchmarks.run --quick    # small sizes, under a minute, no demo; targets not judged
    python -m benchmarks.run --only metrics inference --out benchmarks/results

Sections: metrics (OODMeter vs scikit-learn vs sort), eval_memory (peak RSS from 1 M to
200 M pixels), train_step (data / attack / SegNet / ObsNet split), inference (per image),
demo (wall time of ``python main.py``), onnx (SegNet + observer exported to ONNX: onnxruntime
against eager PyTorch, latency and parity; skipped without onnxruntime).
"""
import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

from benchmarks import demo, eval_memory, inference, metrics, onnx_export, train_step
from benchmarks.common import Spread, machine
from benchmarks.report import markdown

FULL = {
    "metrics": lambda runs: metrics.run((10_000_000, 40_000_000), runs),
    "eval_memory": lambda runs: eval_memory.run((1_000_000, 10_000_000, 50_000_000, 200_000_000)),
    "train_step": lambda runs: train_step.run([((360, 480), 8, 1.0, (False, True)),
                                               ((96, 128), 8, 0.125, (False, True))], runs),
    "inference": lambda runs: [inference.run((360, 480), 1.0, 50, runs),
                               inference.run((96, 128), 0.125, 50, runs)],
    "demo": lambda runs: demo.run(runs),
    "onnx": lambda runs: onnx_export.run((360, 480), 1.0, max(runs, 5)),
}
QUICK = {
    "metrics": lambda runs: metrics.run((1_000_000,), runs),
    "eval_memory": lambda runs: eval_memory.run((1_000_000, 4_000_000)),
    "train_step": lambda runs: train_step.run([((96, 128), 8, 0.125, (False, True))], runs),
    "inference": lambda runs: [inference.run((96, 128), 0.125, 50, runs)],
    "onnx": lambda runs: onnx_export.run((64, 96), 0.0625, runs),
}


def run_sections(table: dict, names, runs: int) -> dict:
    """Run the chosen sections in order, each announced on stderr with its duration."""
    results = {}
    for name in names:
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[name] = table[name](runs)
        print(f"[benchmarks] {name} done in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    return results


def _jsonable(value):
    if isinstance(value, Spread):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def main(argv=None) -> int:
    """Parse the options, run, print the report; write it under --out when given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CI); targets not judged")
    p.add_argument("--only", nargs="+", choices=list(FULL), help="sections to run (default all)")
    p.add_argument("--runs", type=int, default=None,
                   help="timed repetitions per figure (default 3, 2 with --quick)")
    p.add_argument("--out", type=Path, default=None, help="folder for report.md and report.json")
    args = p.parse_args(argv)
    table = QUICK if args.quick else FULL
    if args.quick and args.only and not set(args.only) & set(QUICK):
        p.error(f"--quick has no {', '.join(args.only)} section (quick sections: {', '.join(QUICK)})")
    names = [n for n in (args.only or list(FULL)) if n in table]
    runs = args.runs if args.runs is not None else (2 if args.quick else 3)
    if runs < 1:
        p.error("--runs must be at least 1")
    started = datetime.datetime.now(datetime.timezone.utc)
    results = run_sections(table, names, runs)
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "command": command.strip(),
            "quick": args.quick, "runs": runs, "machine": machine()}
    report = markdown(meta, results)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(report)
        (args.out / "report.json").write_text(
            json.dumps({**meta, "results": results}, default=_jsonable, indent=1))
        print(f"[benchmarks] written: {args.out / 'report.md'}, {args.out / 'report.json'}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
