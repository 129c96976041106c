"""The figures of a test, drawn from the meters' bins (no pixel is stored), written as PNGs
and to TensorBoard: the risk–coverage curve of every method, and the reliability diagrams of
the methods whose score is a probability of error (observed error rate against mean
predicted probability in ECE's 15 uniform groups, ``OODMeter.reliability``)."""
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from obsnet.metrics.risk import curve_points
from obsnet.outputs import atomic_write


def diagram_bins(meters: dict) -> dict:
    """method -> (pixels, sum of probs, errors) per group, for every method whose error
    meter had probabilities (``meters``: ``evaluate``'s, name -> {"error": OODMeter, ...})."""
    bins = {name: by_protocol["error"].reliability() for name, by_protocol in meters.items()}
    return {name: b for name, b in bins.items() if b is not None and b[0].sum() > 0}


def reliability_figure(bins: dict, title: str) -> Figure:
    """One panel per method: bars of the error rate of each non-empty group at its mean
    probability, the diagonal of a calibrated score, and each group's share of pixels."""
    fig = Figure(figsize=(3.2 * len(bins), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    groups = len(next(iter(bins.values()))[0])
    edges = np.linspace(0, 1, groups + 1)
    for i, (name, (count, prob_sum, errors)) in enumerate(bins.items()):
        ax = fig.add_subplot(1, len(bins), i + 1)
        full = count > 0
        rate = np.divide(errors, count, out=np.zeros_like(errors), where=full)
        ax.bar(edges[:-1][full], rate[full], width=1 / groups, align="edge", color="#4c72b0",
               edgecolor="white", label="error rate")
        ax.plot((prob_sum[full] / count[full]), rate[full], "o", color="#dd8452", ms=3,
                label="at mean prob")
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
        share = count / count.sum()
        ax.step(edges[:-1], share, where="post", color="#55a868", lw=1, label="share of pixels")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="probability of error", title=name)
        if i == 0:
            ax.set_ylabel("observed error rate")
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def risk_coverage_figure(meters: dict, split: str):
    """A matplotlib figure: the risk–coverage curve of every method (error protocol, pixels
    accepted from the most confident), AURC in the legend; None when no method has one."""
    curves = {name: m["error"].risk_coverage() for name, m in meters.items()}
    curves = {name: c for name, c in curves.items() if len(c["coverage"])}
    if not curves:
        return None
    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot()
    for name, c in curves.items():
        x, y = curve_points(c["coverage"], c["risk"])
        ax.plot(x, y, label=f"{name} (AURC {100 * c['aurc']:.2f})", linewidth=1.2)
    ax.set(xlabel="coverage (share of pixels accepted)", ylabel="selective risk (error rate)",
           title=f"risk–coverage, {split}", xlim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_rgb(fig: Figure) -> np.ndarray:
    """The rendered figure as an H×W×3 uint8 array."""
    canvas = FigureCanvasAgg(fig)  # whichever canvas it was made with
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_png(path, fig: Figure, label: str | None = None) -> None:
    """Write ``fig`` as a PNG atomically (``label``: the flag naming the folder)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, lambda f: f.write(buffer.getvalue()), label)


def log_figure(writer, fig: Figure, tag: str, step: int = 0) -> None:
    """``fig`` as a TensorBoard image."""
    writer.add_image(tag, figure_rgb(fig), step, dataformats="HWC")
