"""A folder of images -> a triptych PNG (input | segmentation | ObsNet map) and the raw ObsNet
probability map (float16 .npy, input resolution) per image.

    python inference.py --data CamVid --segnet_file ckpt/camvid/segnet.pth \\
        --obsnet_file ckpt/camvid/best.pth --img_folder photos/ --out out/

--out is locked while the run writes; each file is written atomically. Its files are listed in
``MARKER``: an existing output is replaced only with --overwrite and only when listed there.
"""
import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import save_image
from tqdm import tqdm

from obsnet.data.base import read_image
from obsnet.data.specs import SPECS
from obsnet.errors import UsageError
from obsnet.exit_codes import explicit_flags, parse_checked, run_friendly
from obsnet.model_flags import (add_model_flags, check_model_flags, check_nclass_and_size,
                                observer_request)
from obsnet.models.observer_spec import observer_path
from obsnet.models.registry import load_observed
from obsnet.outputs import Output, OutputLock, atomic_write
from obsnet.ownership import (Input, check_outputs_not_inputs, exists, listed_files, planned_in,
                              same_file, unlisted, write_listing)
from obsnet.preset import adopt_recorded_preset
from obsnet.thresholds import alarm_logit
from obsnet.visual import colorize_labels, viridis

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}  # any letter case; .webp: RoadObstacle21's
MARKER = ".written_by_obsnet_inference"  # in --out: the files inference.py wrote there


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Flags named as in main.py; ``prog``: the program name of usage lines (None: argparse's,
    from ``sys.argv[0]``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, choices=sorted(SPECS),
                   help="dataset preset (default: the one --segnet_file records, else CamVid)")
    p.add_argument("--segnet_file", required=True, help="SegNet checkpoint")
    p.add_argument("--obsnet_file", required=True, help="ObsNet checkpoint, or a folder (its best.pth)")
    p.add_argument("--img_folder", required=True, help="folder of images (png, jpg, jpeg, bmp, webp)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out (never other files)")
    add_model_flags(p, "channel width of the checkpoints")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="network input size (default: the preset)")
    p.add_argument("--bsize", type=int, default=4, help="images per batch")
    p.add_argument("--threshold", default=None, metavar="POINT|P",
                   help="also write <image>.alarm.png, 255 where the observer raises an alarm: at "
                        "an operating point of main.py --fit_threshold (tpr, risk, "
                        "conformal_tpr) or above a probability of error P in (0, 1)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def list_images(folder: Path) -> list[Path]:
    """Image files of ``folder``, sorted (the other files are counted in one line); a
    UsageError when there are none."""
    if not folder.is_dir():
        raise UsageError(f"--img_folder {folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise UsageError(f"--img_folder {folder}: no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        print(f"{len(others)} file(s) of {folder} left out, not {'/'.join(sorted(IMAGE_SUFFIXES))}: "
              + ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))
    return images


def output_name(image: Path) -> str:
    """The outputs' name: the image's full file name, so that a.png and a.jpg of one folder
    give a.png.png / a.png.npy and a.jpg.png / a.jpg.npy, never the same file."""
    return image.name


def output_files(images: list[Path], alarms: bool = False) -> list[str]:
    """The files a run writes in --out for ``images``: a triptych and a map per image, and
    with ``alarms`` (--threshold) an alarm mask."""
    exts = (".png", ".npy", ".alarm.png") if alarms else (".png", ".npy")
    return [f"{output_name(image)}{ext}" for image in images for ext in exts]


def check_out(args, images: list[Path]) -> None:
    """UsageError when --out is --img_folder (a rerun would take the outputs as images), or
    when an output would replace an input (an image or a checkpoint), before any work."""
    out, folder = Path(args.out), Path(args.img_folder)
    if same_file(out, folder):
        raise UsageError(f"--out {out}: the same folder as --img_folder {folder} (a rerun would "
                         f"read the outputs as images); choose another --out")
    inputs = [Input("--img_folder image", image) for image in images]
    inputs += [Input("--segnet_file", Path(args.segnet_file)),
               Input("--obsnet_file", observer_path(args.obsnet_file))]
    planned = [*output_files(images, args.threshold is not None), MARKER]
    check_outputs_not_inputs(planned_in("--out", out, planned), inputs)


def claim_out(out: Path, names: list[str], overwrite: bool) -> None:
    """UsageError when a file of ``names`` is in ``out`` and inference.py did not write it
    (not listed in ``MARKER``, even with ``overwrite``), or wrote it and ``overwrite`` is off.
    Then ``MARKER`` lists ``names`` too, before any of them is written."""
    marker = out / MARKER
    listed = listed_files(marker)
    if listed is None and exists(marker):
        raise UsageError(f"--out {out}: {MARKER} there is not inference.py's list of its outputs; "
                         f"not replaced; choose another --out")
    foreign = unlisted(out, names, listed or [])
    if foreign:
        raise UsageError(f"--out {out}: {foreign[0]} there was not written by inference.py (not "
                         f"listed in {MARKER}); not replaced, even with --overwrite; choose "
                         f"another --out")
    earlier = [name for name in names if exists(out / name)]
    if earlier and not overwrite:
        shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise UsageError(f"--out {out}: outputs of an earlier run are there ({shown}); add "
                         f"--overwrite to replace them")
    write_listing(marker, [*(listed or []), *names], "--out", written_by="inference.py")


def prepare(images: list[torch.Tensor], size, spec) -> torch.Tensor:
    """uint8 images of any sizes -> one normalised batch at the network size."""
    batch = [TF.resize(img, list(size), antialias=True) for img in images]
    batch = torch.stack(batch).float() / 255
    return TF.normalize(batch, list(spec.mean), list(spec.std))


@torch.no_grad()
def observe(segnet, obsnet, batch):
    """(class map B×H×W, the observer's logit B×H×W, float32) at the batch's size."""
    feats = segnet(batch, return_feat=True)
    return feats[-1].argmax(dim=1), obsnet(batch, feats).squeeze(1).float()


def predict(segnet, obsnet, batch):
    """(class map B×H×W, probability that the SegNet is wrong B×H×W) at the batch's size."""
    pred, logit = observe(segnet, obsnet, batch)
    return pred, torch.sigmoid(logit)


def save_alarm(alarm: torch.Tensor, size, path: Path) -> None:
    """The alarm mask (True: the observer says the segmenter is wrong) at the input's ``size``
    as an 8-bit PNG, 255 where it raises an alarm."""
    mask = F.interpolate(alarm[None, None].float(), size=tuple(size), mode="nearest")[0, 0]
    png = io.BytesIO()
    Image.fromarray((mask.cpu().numpy() * 255).astype(np.uint8), mode="L").save(png, format="png")
    atomic_write(path, lambda f: f.write(png.getbuffer()), "--out")


def save_outputs(image: torch.Tensor, pred, prob, colors, out: Path, stem: str) -> None:
    """Write ``stem.png`` (input | overlay | viridis map) and ``stem.npy`` at the input's size
    (``stem``: see ``output_name``)."""
    h, w = image.shape[-2:]
    prob = F.interpolate(prob[None, None], size=(h, w), mode="bilinear")[0, 0]
    pred = F.interpolate(pred[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    rgb = image.float() / 255
    overlay = 0.5 * rgb + 0.5 * colorize_labels(pred[None], colors)[0]
    triptych, raw = io.BytesIO(), io.BytesIO()
    save_image(torch.cat([rgb, overlay, viridis(prob[None], 0.0, 1.0)[0]], dim=2), triptych,
               format="png")
    np.save(raw, prob.cpu().numpy().astype(np.float16))
    for data, path in ((triptych, out / f"{stem}.png"), (raw, out / f"{stem}.npy")):
        atomic_write(path, lambda f, data=data: f.write(data.getbuffer()), "--out")


def run(argv, prog: str | None = None) -> int:
    """Parse and check the flags, load the networks (every refusal before --out is touched),
    lock and claim --out, then ``infer`` (``prog``: see ``build_parser``)."""
    parser = build_parser(prog)
    args = parse_checked(parser, argv)
    spec, adopted = adopt_recorded_preset(vars(args), explicit_flags(parser, argv))  # as main.py
    vars(args).update(adopted)  # resolved here, once; read-only from now on
    check_nclass_and_size(args, spec)
    if args.bsize < 1:
        raise UsageError("--bsize must be at least 1")
    check_model_flags(args)
    files = list_images(Path(args.img_folder))
    check_out(args, files)
    nets = load_networks(args, spec)
    with OutputLock([Output("--out", Path(args.out), folder=True)]):
        claim_out(Path(args.out), output_files(files, args.threshold is not None), args.overwrite)
        return infer(args, spec, files, nets)


@dataclass(frozen=True)
class Networks:
    """The frozen segmenter and its observer (eval mode; it applies the ablations it was
    trained with) on ``device``, and the network input ``size``."""

    segnet: torch.nn.Module
    obsnet: torch.nn.Module
    device: torch.device
    size: tuple[int, int]
    alarm_logit: float | None = None  # --threshold, on the observer's logit


def load_networks(args, spec) -> Networks:
    """The checkpoints' networks, loaded as main.py's --test_only loads them (the observer's
    flags and head as its checkpoint records them)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nclass = spec.nclass if args.nclass is None else args.nclass
    size = tuple(args.size or spec.size)
    segnet, obsnet, _ = load_observed(args.obsnet_file, observer_request(args), args.model, nclass,
                                      args.width_mult, args.segnet_file, device, size)
    alarm = None if args.threshold is None else alarm_logit(args.threshold, args.obsnet_file,
                                                             segnet, obsnet)
    return Networks(segnet, obsnet.eval(), device, size, alarm)


def infer(args, spec, files: list[Path], nets: Networks) -> int:
    """Process the images ``files`` in batches into --out."""
    out = Path(args.out)
    for start in tqdm(range(0, len(files), args.bsize), desc="Inference", unit="batch"):
        chunk = files[start:start + args.bsize]
        images = [read_image(f).as_subclass(torch.Tensor) for f in chunk]
        batch = prepare(images, nets.size, spec).to(nets.device)
        preds, logits = observe(nets.segnet, nets.obsnet, batch)
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"NaN or infinite ObsNet map for {chunk[0].parent}: "
                                     f"{', '.join(p.name for p in chunk)}")
        for path, image, pred, logit in zip(chunk, images, preds.cpu(), logits.cpu()):
            save_outputs(image, pred, torch.sigmoid(logit), spec.colors, out, output_name(path))
            if nets.alarm_logit is not None:
                save_alarm(logit > nets.alarm_logit, image.shape[-2:],
                           out / f"{output_name(path)}.alarm.png")
    alarms = "" if nets.alarm_logit is None else ", 8-bit .alarm.png masks"
    print(f"{len(files)} images -> {out} (PNG triptychs and float16 .npy maps{alarms})")
    return 0


def main(argv=None, prog: str = "inference.py") -> int:
    """Entry point: friendly one-line errors (``prog: error: ...``) unless --debug."""
    return run_friendly(prog, lambda a: run(a, prog), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main(prog="python -m obsnet.inference"))
