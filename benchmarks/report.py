"""The markdown report of a benchmark run: machine, tables, targets."""
from benchmarks.inference import total_seconds
from benchmarks.train_step import PARTS
from obsnet.export import parity_line


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _ms(spread) -> str:
    return spread.scaled(1000).text(0 if spread.median >= 0.1 else 1)


def metrics_section(rows) -> list[str]:
    """OODMeter, scikit-learn and the sort-based computation on the same scores."""
    body = [(f"{r['pixels']:,}", r.get("scores", "gaussian"), r["method"], r["seconds"].text(3),
             f"{r['peak_mb']:.0f}", f"{r['speedup_vs_sklearn']:.1f}x", f"{r['max_abs_diff']:.1e}")
            for r in rows]
    return ["## AUROC + AP on N scores", ""] + _table(
        ["scores", "distribution", "implementation", "seconds", "peak MB above data",
         "speed vs scikit-learn", "max abs diff vs scikit-learn"], body)


def eval_memory_section(rows) -> list[str]:
    """Peak RSS of evaluation passes over more and more pixels."""
    body = [(f"{r['pixels']:,}", r["methods"], f"{r['peak_rss_mb']:.0f}", f"{r['growth_mb']:+.0f}",
             f"{r['seconds']:.1f}") for r in rows]
    return ["## Evaluation pass: peak memory against pixels", ""] + _table(
        ["pixels", "methods", "peak RSS MB", "growth MB", "seconds"], body)


def train_step_section(rows) -> list[str]:
    """The observer step, part by part, in milliseconds."""
    body = [(f"{r['device']} {r['size'][0]}x{r['size'][1]} b{r['bsize']} w{r['width']:g}",
             "on" if r["amp"] else "off", *(_ms(r[k]) for k in PARTS),
             f"{r['attack_speedup']:.2f}x ({r['attack_speedup_no_fold']:.2f}x)") for r in rows]
    header = ["setting", "amp", "data wait", "attack", "SegNet fwd", "ObsNet fwd+bwd", "step",
              "attack, BN not folded", "attack with weight grads (original)",
              "speed-up vs original (BN not folded)"]
    return ["## Observer training step (ms, median (min–max, n))", ""] + _table(header, body)


def inference_section(results) -> list[str]:
    """Per-image cost of each method, one table per setting."""
    lines = ["## Inference per image (ms)", ""]
    for r in results:
        lines += [f"{r['device']}, {r['size'][0]}x{r['size'][1]}, width {r['width']:g}, "
                  f"batch 1, MC dropout T = {r['mc_passes']}, amp {'on' if r['amp'] else 'off'}:", ""]
        body = []
        for name, e in r["methods"].items():
            total = e["total"].scaled(1000).text() if name == "segnet_forward" else \
                f"{total_seconds(e) * 1000:.1f}"
            body.append((name, total, "—" if e["added"] is None else _ms(e["added"])))
        lines += _table(["method", "total (image to map)", "added to the SegNet forward"], body)
        lines += [f"ObsNet / SegNet forward: {r['obsnet_over_segnet_forward']:.2f}. MC dropout / "
                  f"ObsNet: {r['mc_dropout_over_obsnet_added']:.1f}x (ObsNet's added cost), "
                  f"{r['mc_dropout_over_obsnet_total']:.1f}x (ObsNet's total).", ""]
    return lines


def onnx_section(r) -> list[str]:
    """onnxruntime against eager PyTorch on the exported SegNet + observer."""
    lines = ["## ONNX export (SegNet + observer, one graph)", ""]
    if "skipped" in r:
        return lines + [f"Skipped: {r['skipped']}.", ""]
    body = [("onnxruntime " + r["onnxruntime_version"], _ms(r["onnxruntime"])),
            (f"PyTorch eager ({r['torch_threads']} threads)", _ms(r["pytorch"]))]
    lines += [f"cpu, {r['size'][0]}x{r['size'][1]}, width {r['width']:g}, batch 1, image in "
              f"[0, 1] to logits and observer_prob:", ""]
    lines += _table(["runtime", "ms per image"], body)
    return lines + [f"onnxruntime / PyTorch speed-up {r['speedup']:.2f}x; export "
                    f"{r['export_seconds']:.0f} s; {parity_line(r['parity'])}.", ""]


def targets(results) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target whose section ran at full size."""
    out = []
    if "metrics" in results:
        meter = [r for r in results["metrics"] if r["method"] == "OODMeter"]
        largest = max(r["pixels"] for r in meter)
        r = min((r for r in meter if r["pixels"] == largest), key=lambda r: r["speedup_vs_sklearn"])
        out.append((f"OODMeter >= 50x faster than scikit-learn at {r['pixels']:,} scores",
                    f"{r['speedup_vs_sklearn']:.0f}x", r["speedup_vs_sklearn"] >= 50))
        worst = max(r.get("max_abs_diff", 0.0) for r in meter)
        out.append(("OODMeter's AUROC and AP within 1e-4 of scikit-learn, every size and distribution",
                    f"{worst:.1e}", worst <= 1e-4))
    if "eval_memory" in results:
        r0, r1 = results["eval_memory"][0], results["eval_memory"][-1]
        out.append((f"evaluation memory growth < 100 MB from {r0['pixels']:,} to {r1['pixels']:,} "
                    "pixels", f"{r1['growth_mb']:+.0f} MB", r1["growth_mb"] < 100))
    if "train_step" in results:
        r = results["train_step"][0]
        where = f"{r['size'][0]}x{r['size'][1]} b{r['bsize']} w{r['width']:g} amp {r['amp']}"
        out.append((f"attack >= 1.4x faster than with weight gradients ({where})",
                    f"{r['attack_speedup']:.2f}x ({r['attack_speedup_no_fold']:.2f}x from input-only "
                    "gradients alone)", r["attack_speedup"] >= 1.4))
        share = r["data_wait"].high / r["step"].median
        out.append((f"training never waits on the loader, 2 workers ({where}): largest wait "
                    "< 1% of a step", f"{r['data_wait'].high * 1000:.1f} ms = {100 * share:.2f}%",
                    share < 0.01))
    if "inference" in results:
        r = results["inference"][0]
        out.append((f"ObsNet <= 1.1x the SegNet forward (width {r['width']:g})",
                    f"{r['obsnet_over_segnet_forward']:.2f}x", r["obsnet_over_segnet_forward"] <= 1.1))
        out.append((f"ObsNet >= 40x cheaper than MC dropout T = {r['mc_passes']} (added cost)",
                    f"{r['mc_dropout_over_obsnet_added']:.1f}x",
                    r["mc_dropout_over_obsnet_added"] >= 40))
    return out


def markdown(meta: dict, results: dict) -> str:
    """The whole report."""
    m = meta["machine"]
    lines = [f"# Benchmark run of {meta['date']}", "", f"Command: `{meta['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
             f"{m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; {m['os']}, Python {m['python']}, "
             f"torch {m['torch']}.", "",
             f"Times are medians of {meta['runs']} timed runs after a warm-up, with (min–max, n).", ""]
    sections = {"metrics": metrics_section, "eval_memory": eval_memory_section,
                "train_step": train_step_section, "inference": inference_section,
                "onnx": onnx_section}
    for name, section in sections.items():
        if name in results:
            lines += section(results[name])
    if "demo" in results:
        lines += ["## Demo", "", f"`python main.py` from a clean folder: {results['demo'].text(0)} s.", ""]
    lines += ["## Targets", ""]
    if meta["quick"]:
        lines += ["Quick sizes: targets are set for the full sizes and not judged here.", ""]
    else:
        lines += _table(["target", "measured", "met"],
                        [(t, v, "yes" if ok else "**no**") for t, v, ok in targets(results)])
    return "\n".join(lines)
