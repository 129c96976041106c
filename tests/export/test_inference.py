"""inference.py on a folder of mixed-size PNG and JPEG files."""
import numpy as np
import pytest
from PIL import Image

from tests.helpers.nets import save_tiny_networks
from tests.helpers.runner import inference_py


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = save_tiny_networks(tmp_path_factory.mktemp("inference"))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 60), "b.jpg": (77, 33), "c.JPEG": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    (images / "notes.txt").write_text("not an image")
    return root


def test_triptych_and_raw_maps_at_input_resolution(checkpoints):
    out = checkpoints / "out"
    run = inference_py("--data", "CamVid", "--segnet_file", str(checkpoints / "segnet.pth"),
                       "--obsnet_file", str(checkpoints / "obsnet"), "--img_folder",
                       str(checkpoints / "images"), "--out", str(out), "--width_mult", "0.0625",
                       "--size", "32", "48", "--bsize", "2")
    assert run.returncode == 0, run.stderr
    # outputs keep the whole file name: a.png and a.jpg of one folder never collide
    for stem, (h, w) in {"a.png": (40, 60), "b.jpg": (77, 33), "c.JPEG": (64, 64)}.items():
        raw = np.load(out / f"{stem}.npy")
        assert raw.dtype == np.float16 and raw.shape == (h, w)
        assert 0 <= raw.min() and raw.max() <= 1  # one sigmoid: probabilities
        with Image.open(out / f"{stem}.png") as picture:
            assert picture.size == (3 * w, h)
    assert not list(out.glob("notes*"))
    assert "1 file(s) of" in run.stdout and "notes.txt" in run.stdout


def test_bad_folder_and_checkpoint_are_one_line(checkpoints, tmp_path):
    common = ["--segnet_file", str(checkpoints / "segnet.pth"), "--out", str(tmp_path / "o"),
              "--width_mult", "0.0625"]
    run = inference_py(*common, "--obsnet_file", str(checkpoints / "obsnet"),
                       "--img_folder", str(tmp_path / "none"))
    assert run.returncode == 2 and "folder not found" in run.stderr and "Traceback" not in run.stderr
    run = inference_py(*common, "--obsnet_file", str(tmp_path / "missing.pth"),
                       "--img_folder", str(checkpoints / "images"))
    assert run.returncode == 1 and "missing.pth" in run.stderr and "Traceback" not in run.stderr
