"""ONNX export of SegNet + observer: latency per image in onnxruntime against eager PyTorch,
and the largest differences between the two.

    python -m benchmarks.onnx_export --size 360 480 --width_mult 1.0 --runs 5

Both run on the CPU, one image at a time (batch 1), with their default thread counts; the
times are medians after one warm-up run. Random weights (batch norms at their initial
statistics): latency does not depend on the weights.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from obsnet import export
from benchmarks.common import repeat
from obsnet.data.specs import SPECS
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.segnet import SegNet, freeze


def missing_exporter() -> str | None:
    """What is missing to export and run ONNX (onnxscript, onnxruntime), or None."""
    import importlib.util
    missing = [name for name in ("onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def graph_at(width: float, nclass: int) -> export.ExportGraph:
    """A frozen SegNet and observer at ``width``, random weights, with CamVid's normalisation."""
    torch.manual_seed(0)
    segnet = freeze(SegNet(3, nclass, width_mult=width))
    observer = freeze(Obsnet_Seg(3, 1, width_mult=width))
    return export.ExportGraph(segnet, observer, SPECS["CamVid"].mean, SPECS["CamVid"].std)


def run(size=(360, 480), width: float = 1.0, runs: int = 5, nclass: int = 12) -> dict:
    """Export seconds, per-image seconds (Spreads) of onnxruntime and PyTorch, and parity
    rows (``export.parity``); ``{"skipped": reason}`` without onnxscript or onnxruntime."""
    reason = missing_exporter()
    if reason is not None:
        return {"skipped": reason}
    import onnxruntime

    graph = graph_at(width, nclass)
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as folder:
        path = Path(folder) / "model.onnx"
        start = time.perf_counter()
        path.write_bytes(export.export_bytes(graph, tuple(size)))
        export_seconds = time.perf_counter() - start
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {export.INPUT_NAME: image.numpy()}
        ort_time = repeat(lambda: session.run(None, feed), runs)
        with torch.no_grad():
            torch_time = repeat(lambda: graph(image), runs)
        rows = export.parity(path, graph, export.check_cases(tuple(size)))
    return {"size": tuple(size), "width": width, "runs": runs, "export_seconds": export_seconds,
            "onnxruntime": ort_time, "pytorch": torch_time,
            "speedup": torch_time.median / ort_time.median, "parity": rows,
            "onnxruntime_version": onnxruntime.__version__, "torch_threads": torch.get_num_threads()}


def main() -> None:
    """Print the latencies and the parity line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=[360, 480])
    p.add_argument("--width_mult", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    out = run(tuple(args.size), args.width_mult, args.runs)
    if "skipped" in out:
        print(f"skipped: {out['skipped']}")
        return
    print(f"export {out['export_seconds']:.0f} s; per image: onnxruntime "
          f"{out['onnxruntime'].scaled(1000).text()} ms, PyTorch {out['pytorch'].scaled(1000).text()} ms "
          f"({out['speedup']:.2f}x)")
    print(export.parity_line(out["parity"]))


if __name__ == "__main__":
    main()
