"""Observer ablations on real CamVid, against the SegNet of ``benchmarks.real_camvid``: each
variant trains an observer and is scored on val_ood, next to MCP and MC dropout.

    python -m benchmarks.real_camvid --camvid /path/to/CamVid --out runs/real_camvid   # first
    python -m benchmarks.real_camvid_ablations --camvid /path/to/CamVid --out runs/real_camvid \\
        --only adv epsilon

Variants (``--only`` picks groups): the attack (``none``, ``min_random_patch``,
``max_random_patch``, ``min_all_image``, ``fractal``), ε in {0.01, 0.025, 0.05, 0.1}, the
original head against the linear one, no initialisation from the SegNet, and twice the epochs.
Every other flag is the recipe's. ``--only`` takes groups or single variants (``adv-none
epsilon-0.1``), run in the order given. A variant whose results exist is not run again, one
whose training was interrupted continues with ``--resume``, and one that equals the recipe's
observer (``adv-min_random_patch``, ``epsilon-0.025``) is not trained: the recipe's results
stand for it. The table (markdown, for BENCHMARKS.md) shows every variant
with results so far, in the groups' order; it goes to stdout and ``<out>/ablations.md``. A
variant "wins" when it beats MCP, MC dropout and ``--adv none`` on both error and OOD AUROC
with both FPR95 < 100%.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.real_camvid import (ROOT, build_parser, common_args, continue_flag, link_camvid,
                                    observer_args, results_file, test_args)

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
    """(train command, test command, results file) of one variant."""
    folder = variant_folder(args, change)
    varied = replace_args(args, change)
    train = [sys.executable, "main.py", *common_args(varied),
             *observer_args(varied, folder / "ckpt"), "--tboard", str(folder / "train_logs"),
             *(["--no_pretrained"] if change.get("no_pretrained") else []),
             *continue_flag(folder / "ckpt" / "last.pth")]
    test = [sys.executable, "main.py", *common_args(varied),
            *test_args(varied, folder / "ckpt", "obsnet", "val_ood", folder / "val_ood")]
    return train, test, results_file(folder / "val_ood", "val_ood")


def variant_folder(args, change: dict) -> Path:
    """Where a variant's checkpoints, logs, results and wall time go."""
    return args.out / "ablations" / variant_name(change)


def same_as_recipe(args, change: dict) -> bool:
    """True when the variant's observer is the recipe's own (nothing to train)."""
    varied = replace_args(args, change)
    return (not change.get("no_pretrained")
            and observer_args(varied, Path()) == observer_args(args, Path()))


def replace_args(args, change: dict) -> argparse.Namespace:
    """The recipe's arguments with a variant's changes (epochs as a factor)."""
    fields = {k: v for k, v in change.items() if k in vars(args)}
    if "obs_epochs_factor" in change:
        fields["obs_epochs"] = args.obs_epochs * change["obs_epochs_factor"]
    return argparse.Namespace(**(vars(args) | fields))


def run_variant(args, change: dict, log_file: Path) -> None:
    """Train and test one variant unless its results exist or it is the recipe's observer;
    its wall time goes to ``seconds.json`` beside its results."""
    train, test, results = variant_commands(args, change)
    if results.exists() or same_as_recipe(args, change):
        return
    start = time.perf_counter()
    for command in (train, test):
        print(f"[ablations] {variant_name(change)}: {' '.join(command)}", flush=True)
        with open(log_file, "a") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"ablations: error: {variant_name(change)} failed; see {log_file}")
    (variant_folder(args, change) / "seconds.json").write_text(
        json.dumps({"seconds": time.perf_counter() - start}))


def collect(args, recipe_obsnet: dict) -> dict:
    """Every variant with results so far: {name: {"entry", "seconds"}}, in the groups' order
    (the recipe's observer for the variants that equal it, with no time of their own)."""
    variants = {}
    for change in (c for changes in GROUPS.values() for c in changes):
        _, _, results = variant_commands(args, change)
        seconds_file = variant_folder(args, change) / "seconds.json"
        if same_as_recipe(args, change):
            variants[variant_name(change) + " (= recipe)"] = {"entry": recipe_obsnet,
                                                              "seconds": None}
        elif results.exists():
            seconds = (json.loads(seconds_file.read_text())["seconds"]
                       if seconds_file.exists() else None)
            variants[variant_name(change)] = {
                "entry": json.loads(results.read_text())["methods"]["obsnet"],
                "seconds": seconds}
    return variants


def chosen_changes(only: list[str]) -> list[dict]:
    """The variants ``--only`` names (groups or single variants), in its order, once each."""
    by_name = {variant_name(c): c for changes in GROUPS.values() for c in changes}
    chosen = {}
    for item in only:
        for change in GROUPS.get(item) or [by_name[item]]:
            chosen.setdefault(variant_name(change), change)
    return list(chosen.values())


def _cells(entry: dict) -> list[str]:
    return [f"{100 * entry[block][key]:.1f}" if entry[block][key] is not None else "n/a"
            for block, key in COLUMNS]


def wins(entry: dict, rivals) -> bool:
    """Ahead of every rival on both error and OOD AUROC, with both FPR95 below 100%."""
    ahead = all(entry["ood"]["auroc"] > r["ood"]["auroc"] and
                entry["error"]["auroc"] > r["error"]["auroc"] for r in rivals if r is not entry)
    return ahead and entry["ood"]["fpr95"] < 1 and entry["error"]["fpr95"] < 1


def table(baselines: dict, variants: dict) -> str:
    """Markdown: the baselines, then each variant, with whether it wins against MCP, MC
    dropout and ``--adv none``."""
    none = variants.get("adv-none", {}).get("entry")
    rivals = [e for e in (baselines.get("mcp"), baselines.get("mc_dropout"), none) if e is not None]
    lines = ["| variant | OOD AUROC | OOD FPR95 | Err AUROC | Err FPR95 | beats MCP, MC dropout, "
             "adv none | minutes |", "|---|---|---|---|---|---|---|"]
    for name, entry in baselines.items():
        lines.append(f"| {name} (recipe) | " + " | ".join(_cells(entry)) + " | | |")
    for name, v in variants.items():
        e = v["entry"]
        minutes = "" if v["seconds"] is None else f"{v['seconds'] / 60:.0f}"
        verdict = "(no attack)" if e is none else "yes" if wins(e, rivals) else "no"
        lines.append(f"| {name} | " + " | ".join(_cells(e)) + f" | {verdict} | {minutes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the chosen variants and print the table of every variant with results."""
    p = build_parser()
    names = [variant_name(c) for changes in GROUPS.values() for c in changes]
    p.add_argument("--only", nargs="+", choices=list(GROUPS) + names, default=list(GROUPS),
                   metavar="GROUP_OR_VARIANT", help=f"groups {list(GROUPS)} or variants {names}")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    link_camvid(args.camvid.expanduser().resolve(), args.out / "data")
    recipe_results = results_file(args.out / "logs" / "val_ood", "val_ood")
    if not recipe_results.exists():
        raise SystemExit(f"ablations: error: {recipe_results} not found; run "
                         "benchmarks.real_camvid first")
    methods = json.loads(recipe_results.read_text())["methods"]
    baselines = {m: methods[m] for m in ("obsnet", "mcp", "mc_dropout") if m in methods}
    for change in chosen_changes(args.only):
        run_variant(args, change, args.out / "ablations.log")
    text = table(baselines, collect(args, methods["obsnet"]))
    (args.out / "ablations.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
