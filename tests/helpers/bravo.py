"""A miniature BRAVO benchmark tree (the input images of github.com/valeoai/bravo_challenge's
README, Appendix A1), with the names each subset's files carry."""
from pathlib import Path

import numpy as np
from PIL import Image

# relative image path -> (H, W); each subset's own naming
FRAMES = {
    "bravo_ACDC/fog/test/GOPR0475/GOPR0475_frame_000247_rgb_anon.png": (40, 72),
    "bravo_ACDC/night/test/GOPR0355/GOPR0355_frame_000138_rgb_anon.png": (36, 64),
    "bravo_SMIYC/RoadAnomaly21/images/airplane0000.jpg": (30, 50),
    "bravo_outofcontext/frankfurt/frankfurt_000000_000576_leftImg8bit.png": (32, 64),
    "bravo_synobjs/armchair/1.png": (33, 47),
}


def submission_name(image: str, kind: str) -> str:
    """The file the toolkit's encoder expects for ``image``: suffix replaced by ``_<kind>.png``."""
    return str(Path(image).with_suffix("")) + f"_{kind}.png"


def make_bravo(root: Path) -> Path:
    """Write every frame of ``FRAMES`` under ``root`` (random RGB); returns ``root``."""
    rng = np.random.default_rng(0)
    for rel, (h, w) in FRAMES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return root
