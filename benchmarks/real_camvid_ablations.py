"""Observer ablations on real CamVid, against the SegNet of ``benchmarks.real_camvid``: each
variant trains an observer and is scored on val_ood, next to MCP and MC dropout.

    python -m benchmarks.real_camvid --camvid /path/to/CamVid --out runs/real_camvid   # first
    python -m benchmarks.real_camvid_ablations --camvid /path/to/CamVid --out runs/real_camvid \\
        --only adv epsilon

Variants (``--only`` picks groups): the attack (``none``, ``min_random_patch``,
``max_random_patch``, ``min_all_image``, ``fractal``), ε in {0.01, 0.025, 0.05, 0.1}, the
original head against the linear one, no initialisation from the SegNet, and twice the epochs.
Every other flag is the recipe's. A variant whose results exist is not run again; one whose
training was interrupted continues with ``--resume``. The table
(markdown, for BENCHMARKS.md) goes to stdout and ``<out>/ablations.md``; a variant "wins" when
it beats MCP, MC dropout and ``--adv none`` on both error and OOD AUROC with both FPR95 < 100%.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.real_camvid import (ROOT, build_parser, common_args, continue_flag, link_camvid,
                                    observer_args, test_args)

GROUPS = {
    "adv": [{"adv": a} for a in ("none", "min_random_patch", "max_random_patch", "min_all_image",
                                 "fractal")],
    "epsilon": [{"epsilon": e} for e in (0.01, 0.025, 0.05, 0.1)],
    "head": [{"obs_head": "original"}],
    "init": [{"no_pretrained": True}],
    "epochs": [{"obs_epochs_factor": 2}],
}
COLUMNS = (("ood", "auroc"), ("ood", "fpr95"), ("error", "auroc"), ("error", "fpr95"))


def variant_name(change: dict) -> str:
    """A folder name for a variant, e.g. ``adv-none`` or ``epsilon-0.05``."""
    return "_".join(f"{k}-{v}" for k, v in change.items())


def variant_commands(args, change: dict) -> tuple[list[str], list[str], Path]:
    """(train command, test command, results.json) of one variant."""
    folder = args.out / "ablations" / variant_name(change)
    varied = replace_args(args, change)
    train = [sys.executable, "main.py", *common_args(varied),
             *observer_args(varied, folder / "ckpt"), "--tboard", str(folder / "train_logs"),
             *(["--no_pretrained"] if change.get("no_pretrained") else []),
             *continue_flag(folder / "ckpt" / "last.pth")]
    test = [sys.executable, "main.py", *common_args(varied),
            *test_args(varied, folder / "ckpt", "obsnet", "val_ood", folder / "val_ood")]
    return train, test, folder / "val_ood" / "results.json"


def replace_args(args, change: dict) -> argparse.Namespace:
    """The recipe's arguments with a variant's changes (epochs as a factor)."""
    fields = {k: v for k, v in change.items() if k in vars(args)}
    if "obs_epochs_factor" in change:
        fields["obs_epochs"] = args.obs_epochs * change["obs_epochs_factor"]
    return argparse.Namespace(**(vars(args) | fields))


def run_variant(args, change: dict, log_file: Path) -> dict:
    """Train and test one variant unless its results exist; its obsnet entry and seconds."""
    train, test, results = variant_commands(args, change)
    seconds = None
    if not results.exists():
        start = time.perf_counter()
        for command in (train, test):
            print(f"[ablations] {variant_name(change)}: {' '.join(command)}", flush=True)
            with open(log_file, "a") as log:
                done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                raise SystemExit(f"ablations: error: {variant_name(change)} failed; see {log_file}")
        seconds = time.perf_counter() - start
    entry = json.loads(results.read_text())["methods"]["obsnet"]
    return {"entry": entry, "seconds": seconds}


def _cells(entry: dict) -> list[str]:
    return [f"{100 * entry[block][key]:.1f}" if entry[block][key] is not None else "n/a"
            for block, key in COLUMNS]


def wins(entry: dict, rivals) -> bool:
    """Ahead of every rival on both error and OOD AUROC, with both FPR95 below 100%."""
    ahead = all(entry["ood"]["auroc"] > r["ood"]["auroc"] and
                entry["error"]["auroc"] > r["error"]["auroc"] for r in rivals if r is not entry)
    return ahead and entry["ood"]["fpr95"] < 1 and entry["error"]["fpr95"] < 1


def table(baselines: dict, variants: dict) -> str:
    """Markdown: the baselines, then each variant, with whether it wins."""
    none = variants.get("adv-none", {}).get("entry")
    rivals = [e for e in (*baselines.values(), none) if e is not None]
    lines = ["| variant | OOD AUROC | OOD FPR95 | Err AUROC | Err FPR95 | beats MCP, MC dropout, "
             "adv none | minutes |", "|---|---|---|---|---|---|---|"]
    for name, entry in baselines.items():
        lines.append(f"| {name} (recipe) | " + " | ".join(_cells(entry)) + " | | |")
    for name, v in variants.items():
        e = v["entry"]
        minutes = "" if v["seconds"] is None else f"{v['seconds'] / 60:.0f}"
        lines.append(f"| {name} | " + " | ".join(_cells(e)) +
                     f" | {'yes' if wins(e, rivals) else 'no'} | {minutes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the chosen groups of variants and print the table."""
    p = build_parser()
    p.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    link_camvid(args.camvid.expanduser().resolve(), args.out / "data")
    recipe_results = args.out / "logs" / "val_ood" / "results.json"
    if not recipe_results.exists():
        raise SystemExit(f"ablations: error: {recipe_results} not found; run "
                         "benchmarks.real_camvid first")
    methods = json.loads(recipe_results.read_text())["methods"]
    baselines = {m: methods[m] for m in ("obsnet", "mcp", "mc_dropout") if m in methods}
    variants = {}
    for group in args.only:
        for change in GROUPS[group]:
            variants[variant_name(change)] = run_variant(args, change, args.out / "ablations.log")
    text = table(baselines, variants)
    (args.out / "ablations.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
