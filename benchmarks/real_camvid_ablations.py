"""Observer ablations on real CamVid, against the SegNet of ``benchmarks.real_camvid``: each
variant trains an observer and is scored on val_ood_real (real cut-outs, the split the default
is chosen on) and val_ood (procedural shapes), next to the one-pass baselines and MC dropout.

    python -m benchmarks.real_camvid --camvid /path/to/CamVid --objects /path/to/objects \\
        --out runs/real_camvid                                                   # first
    python -m benchmarks.real_camvid_ablations --camvid /path/to/CamVid \\
        --objects /path/to/objects --out runs/real_camvid --only inputs kind

A variant is an observer (what it reads: ``--obs_inputs``; its kind: ``--obs_kind``; its
training perturbation: ``--adv``; its epochs), every other flag the recipe's. The groups
change one of them from the recipe's observer: ``inputs`` (features, logits, maps), ``kind``
(mirror, layer), ``perturbation`` (none, the FGSM patch, a pasted procedural object, both),
``epochs`` (half, same, twice), and ``previous`` is the default before the observer read the
logits (features, mirror, FGSM patch). ``--only`` takes groups or single variants (their
names, e.g. ``maps-layer-paste+min_random_patch-10ep``), run in the order given.

A variant whose results exist is not run again; one whose training was interrupted continues
with ``--resume``; the recipe's own observer is not trained again (its results stand). The
table (markdown, for BENCHMARKS.md; stdout and ``<out>/ablations.md``) shows every variant with
results so far, with the observer's cost: ms per image of its test (SegNet forward included)
and GFLOPs per 360x480 frame (``torch.utils.flop_counter``, the observer alone; the SegNet's in
its own row). A variant "wins" when it is ahead of MCP, entropy, max logit, energy and MC
dropout on both OOD and error AUROC on val_ood_real, with both FPR95 below 100%.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.real_camvid import (ROOT, build_parser, common_args, continue_flag, link_camvid,
                                    observer_args, results_file, test_args)
from obsnet.models.observer_spec import DEFAULT_INPUTS, DEFAULT_KIND, ObserverSpec
from obsnet.models.registry import build_observer, build_segmenter

SPLITS = ("val_ood_real", "val_ood")  # scored, in order: the first one decides
RIVALS = ("mcp", "entropy", "max_logit", "energy", "mc_dropout")
FRAME = (360, 480)  # the paper's CamVid frame, for the GFLOPs column
CAMVID_CLASSES = 12


class Variant(NamedTuple):
    """One observer to train: what it reads, its kind, its perturbation, its epochs."""

    inputs: str
    kind: str
    adv: str
    epochs: int

    @property
    def name(self) -> str:
        """A folder name, e.g. ``maps-mirror-paste+min_random_patch-10ep``."""
        return f"{self.inputs}-{self.kind}-{self.adv}-{self.epochs}ep"


def recipe_variant(args) -> Variant:
    """The recipe's own observer."""
    return Variant(args.obs_inputs or DEFAULT_INPUTS, args.obs_kind or DEFAULT_KIND, args.adv,
                   args.obs_epochs)


def groups(args) -> dict[str, list[Variant]]:
    """The groups: each changes one thing of the recipe's observer (``previous``: the old
    default, before the observer read the logits)."""
    base = recipe_variant(args)
    return {
        "inputs": [base._replace(inputs=i) for i in ("features", "logits", "maps")],
        "kind": [base._replace(kind=k) for k in ("mirror", "layer")],
        "perturbation": [base._replace(adv=a) for a in
                         ("none", "min_random_patch", "paste", "paste+min_random_patch")],
        "epochs": [base._replace(epochs=e) for e in
                   (max(1, args.obs_epochs // 2), args.obs_epochs, 2 * args.obs_epochs)],
        "previous": [Variant("features", "mirror", "min_random_patch", args.obs_epochs)],
    }


def all_variants(args) -> list[Variant]:
    """Every variant of every group, in the groups' order, once each."""
    return list(dict.fromkeys(v for vs in groups(args).values() for v in vs))


def chosen_variants(args, only: list[str]) -> list[Variant]:
    """The variants ``only`` names (groups or variant names), in its order, once each; a
    SystemExit naming an unknown one."""
    by_group, by_name = groups(args), {v.name: v for v in all_variants(args)}
    chosen = []
    for item in only:
        if item not in by_group and item not in by_name:
            raise SystemExit(f"ablations: error: --only {item}: not a group ({', '.join(by_group)}) "
                             f"nor a variant ({', '.join(by_name)})")
        chosen += by_group.get(item) or [by_name[item]]
    return list(dict.fromkeys(chosen))


def variant_args(args, variant: Variant) -> argparse.Namespace:
    """The recipe's arguments with a variant's observer."""
    return argparse.Namespace(**(vars(args) | {"obs_inputs": variant.inputs,
                                               "obs_kind": variant.kind, "adv": variant.adv,
                                               "obs_epochs": variant.epochs}))


def variant_folder(args, variant: Variant) -> Path:
    """Where a variant's checkpoints, logs, results and wall time go (the recipe's own folders
    for the recipe's observer)."""
    return args.out if variant == recipe_variant(args) else args.out / "ablations" / variant.name


def variant_results(args, variant: Variant, split: str) -> Path:
    """The results file of a variant on ``split``."""
    folder = variant_folder(args, variant)
    return results_file(folder / "logs" / split, split)


def variant_commands(args, variant: Variant) -> tuple[list[str], list[list[str]]]:
    """(train command, test commands: one per split of SPLITS) of a variant."""
    folder, varied = variant_folder(args, variant), variant_args(args, variant)
    ckpt = folder / "ckpt" / "obsnet"
    train = [sys.executable, "main.py", *common_args(varied), *observer_args(varied, ckpt),
             "--tboard", str(folder / "logs" / "obsnet"), *continue_flag(ckpt / "last.pth")]
    tests = [[sys.executable, "main.py", *common_args(varied),
              *test_args(varied, ckpt, "obsnet", split, folder / "logs" / split)]
             for split in SPLITS]
    return train, tests


def run_variant(args, variant: Variant, log_file: Path) -> None:
    """Train and test one variant unless its results exist or it is the recipe's observer;
    its training wall time goes to ``seconds.json`` in its folder."""
    if variant == recipe_variant(args) or all(variant_results(args, variant, s).exists()
                                              for s in SPLITS):
        return
    train, tests = variant_commands(args, variant)
    folder = variant_folder(args, variant)
    folder.mkdir(parents=True, exist_ok=True)
    for index, command in enumerate([train, *tests]):
        print(f"[ablations] {variant.name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        with open(log_file, "a") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"ablations: error: {variant.name} failed; see {log_file}")
        if index == 0:
            (folder / "seconds.json").write_text(
                json.dumps({"seconds": time.perf_counter() - start}))


@torch.no_grad()
def gflops(module: torch.nn.Module, *inputs) -> float:
    """GFLOPs of one forward pass (``torch.utils.flop_counter``: a multiply-add counts 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        module(*inputs)
    return counter.get_total_flops() / 1e9


def costs(width_mult: float, variant: Variant) -> dict:
    """The variant's observer cost per FRAME: GFLOPs and parameters, and the SegNet's GFLOPs."""
    segnet = build_segmenter("segnet", CAMVID_CLASSES, width_mult)
    observer = build_observer(ObserverSpec("segnet", kind=variant.kind, inputs=variant.inputs),
                              segnet, CAMVID_CLASSES, width_mult)
    segnet.eval(), observer.eval()
    image = torch.zeros(1, 3, *FRAME)
    with torch.no_grad():
        feats = segnet(image, return_feat=True)
    observer_flops = gflops(observer, image, feats)
    return {"gflops": observer_flops, "segnet_gflops": gflops(segnet, image),
            "params": sum(p.numel() for p in observer.parameters())}


def load_entry(path: Path, method: str) -> dict | None:
    """A method's results in a results file, None when the file is missing."""
    return json.loads(path.read_text())["methods"][method] if path.exists() else None


def collect(args) -> dict[Variant, dict]:
    """Every variant with results on SPLITS[0] so far: {variant: {split: entry, "seconds"}}."""
    found = {}
    for variant in all_variants(args):
        entries = {s: load_entry(variant_results(args, variant, s), "obsnet") for s in SPLITS}
        if entries[SPLITS[0]] is None:
            continue
        seconds_file = variant_folder(args, variant) / "seconds.json"
        seconds = json.loads(seconds_file.read_text())["seconds"] if seconds_file.exists() else None
        found[variant] = entries | {"seconds": seconds}
    return found


def wins(entry: dict, rivals) -> bool:
    """Ahead of every rival on both error and OOD AUROC, with both FPR95 below 100%."""
    ahead = all(entry["ood"]["auroc"] > r["ood"]["auroc"] and
                entry["error"]["auroc"] > r["error"]["auroc"] for r in rivals)
    return ahead and entry["ood"]["fpr95"] < 1 and entry["error"]["fpr95"] < 1


def _pct(entry: dict | None, block: str, key: str) -> str:
    value = None if entry is None else entry.get(block, {}).get(key)
    return "n/a" if value is None else f"{100 * value:.1f}"


def _metric_cells(entries: dict) -> list[str]:
    first, second = entries.get(SPLITS[0]), entries.get(SPLITS[1])
    return [_pct(first, "ood", "auroc"), _pct(first, "ood", "fpr95"), _pct(first, "error", "auroc"),
            _pct(first, "error", "fpr95"), _pct(second, "ood", "auroc"),
            _pct(second, "error", "auroc")]


def table(baselines: dict, variants: dict, cost) -> str:
    """Markdown: the baselines (``{method: {split: entry}}``), then each variant with its
    cost (``cost(variant)``: see ``costs``) and whether it wins against every baseline."""
    rivals = [b[SPLITS[0]] for m, b in baselines.items() if m in RIVALS and b.get(SPLITS[0])]
    head = ["row", "inputs", "kind", "perturbation", "epochs", f"{SPLITS[0]} OOD AUROC",
            "OOD FPR95", "Err AUROC", "Err FPR95", f"{SPLITS[1]} OOD AUROC", "Err AUROC",
            "ms/img", "GFLOPs", "params", "beats all 5", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    segnet_gflops = None
    for variant, entries in variants.items():
        c = cost(variant)
        segnet_gflops = c["segnet_gflops"]
        first = entries[SPLITS[0]]
        minutes = "" if entries["seconds"] is None else f"{entries['seconds'] / 60:.0f}"
        lines.append(f"| observer | {variant.inputs} | {variant.kind} | {variant.adv} | "
                     f"{variant.epochs} | " + " | ".join(_metric_cells(entries)) +
                     f" | {first['ms_per_image']:.0f} | {c['gflops']:.2f} | "
                     f"{c['params'] / 1e6:.2f}M | {'yes' if wins(first, rivals) else 'no'} | "
                     f"{minutes} |")
    for method, entries in baselines.items():
        first = entries.get(SPLITS[0]) or {}
        passes = " x T" if method == "mc_dropout" else ""  # one SegNet pass per sample
        flops = "" if segnet_gflops is None else f"{segnet_gflops:.2f}{passes} (SegNet)"
        ms = f"{first['ms_per_image']:.0f}" if "ms_per_image" in first else ""
        lines.append(f"| {method} | | | | | " + " | ".join(_metric_cells(entries)) +
                     f" | {ms} | {flops} | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the chosen variants and print the table of every variant with results."""
    p = build_parser()
    p.add_argument("--only", nargs="+", default=["inputs", "kind", "perturbation", "previous"],
                   metavar="GROUP_OR_VARIANT",
                   help="groups (inputs, kind, perturbation, epochs, previous) or variant names "
                        "(default: every group but epochs)")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    link_camvid(args.camvid.expanduser().resolve(), args.out / "data")
    recipe_results = {s: results_file(args.out / "logs" / s, s) for s in SPLITS}
    missing = [str(path) for path in recipe_results.values() if not path.exists()]
    if missing:
        raise SystemExit(f"ablations: error: {missing[0]} not found; run benchmarks.real_camvid "
                         f"with --objects first")
    chosen = chosen_variants(args, args.only)
    for variant in chosen:
        run_variant(args, variant, args.out / "ablations.log")
    baselines = {m: {s: load_entry(path, m) for s, path in recipe_results.items()}
                 for m in RIVALS}
    text = table(baselines, collect(args), lambda v: costs(args.width_mult, v))
    (args.out / "ablations.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
