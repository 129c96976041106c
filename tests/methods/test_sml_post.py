"""SML's boundary suppression and dilated smoothing (obsnet/sml_post.py) against brute-force
loops and scipy.ndimage, and the ``sml_post`` method built on them."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from obsnet.methods import METHODS, EvalBatch, MethodConfig
from obsnet.models.segnet import SegNet, freeze
from obsnet.sml_post import (class_boundaries, dilated_smoothing, gaussian_kernel,
                             suppress_boundaries, widen)
from obsnet.stats import toy_class_stats

CROSS = ndimage.generate_binary_structure(2, 1)


def _pred(seed: int, h: int = 23, w: int = 31) -> np.ndarray:
    """Blocky class maps: regions of a few classes, as a segmenter predicts."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 4, (h // 5 + 1, w // 5 + 1))
    return np.kron(small, np.ones((5, 5), int))[:h, :w]


def boundaries_by_scipy(pred: np.ndarray) -> np.ndarray:
    # 'nearest' borders: a replicated pixel is already in the 3x3 neighbourhood, so the
    # pixels outside the image change neither the max nor the min
    dilated = ndimage.grey_dilation(pred, footprint=CROSS, mode="nearest")
    eroded = ndimage.grey_erosion(pred, size=(3, 3), mode="nearest")
    return dilated != eroded


def suppress_by_loops(score: np.ndarray, pred: np.ndarray, width=4, iterations=4) -> np.ndarray:
    """The paper's boundary suppression, pixel by pixel."""
    h, w = score.shape
    boundaries = boundaries_by_scipy(pred)
    out = score.astype(np.float64).copy()
    for i in range(iterations):
        radius = 0 if i == iterations - 1 else width - (width // iterations) * i - 1
        band = ndimage.binary_dilation(boundaries, CROSS, iterations=radius) if radius else boundaries
        new = out.copy()
        for y in range(h):
            for x in range(w):
                if not band[y, x]:
                    continue
                values = [out[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]
                          for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                          if not band[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]]
                if values:
                    new[y, x] = sum(values) / len(values)
        out = new
    return out


@pytest.mark.parametrize("seed", range(3))
def test_boundaries_and_widening_match_scipy(seed):
    pred = _pred(seed)
    got = class_boundaries(torch.from_numpy(pred)[None])[0].numpy()
    np.testing.assert_array_equal(got, boundaries_by_scipy(pred))
    assert got.any() and not got.all()
    for radius in (1, 3):
        np.testing.assert_array_equal(
            widen(torch.from_numpy(got)[None], radius)[0].numpy(),
            ndimage.binary_dilation(got, CROSS, iterations=radius))


def test_boundaries_of_a_single_class_map_are_empty_at_the_image_border_too():
    assert not class_boundaries(torch.zeros(1, 6, 7, dtype=torch.long)).any()


@pytest.mark.parametrize("seed", range(3))
def test_suppression_matches_the_pixel_loop(seed):
    pred = _pred(seed)
    score = np.random.default_rng(10 + seed).normal(5.0, 2.0, pred.shape)
    got = suppress_boundaries(torch.from_numpy(score)[None], torch.from_numpy(pred)[None])
    np.testing.assert_allclose(got[0].numpy(), suppress_by_loops(score, pred), atol=1e-10)
    # pixels far from every boundary keep their score
    far = ~ndimage.binary_dilation(boundaries_by_scipy(pred), CROSS, iterations=4)
    np.testing.assert_array_equal(got[0].numpy()[far], score[far])
    with pytest.raises(ValueError, match="multiple"):
        suppress_boundaries(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), 3, 2)


def test_dilated_smoothing_matches_scipy_correlate():
    score = np.random.default_rng(0).normal(0, 1, (1, 29, 41))
    kernel = np.zeros((37, 37))
    kernel[::6, ::6] = gaussian_kernel(7, 1.0).numpy()  # 7x7 taps 6 pixels apart
    expected = ndimage.correlate(score[0], kernel, mode="nearest")
    got = dilated_smoothing(torch.from_numpy(score))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-10)
    g = gaussian_kernel(7, 1.0).numpy()
    assert abs(g.sum() - 1) < 1e-12 and g[3, 3] == g.max() and np.allclose(g, g.T)
    # a constant map stays constant (weights sum to 1, borders replicated)
    np.testing.assert_allclose(dilated_smoothing(torch.full((1, 9, 9), 3.5)).numpy(), 3.5)


def test_sml_post_is_the_post_processed_sml():
    torch.manual_seed(0)
    segnet = freeze(SegNet(3, 12, width_mult=0.125))
    cfg = MethodConfig(class_stats=toy_class_stats(12, 8))
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        batch = EvalBatch(images, segnet, None, segnet(images, return_feat=True), ())
        sml, post = METHODS["sml"].fn(batch, cfg), METHODS["sml_post"].fn(batch, cfg)
        pred = batch.feats[-1].argmax(dim=1)
    for i in range(2):
        by_hand = suppress_by_loops(sml[i].double().numpy(), pred[i].numpy())
        kernel = np.zeros((37, 37))
        kernel[::6, ::6] = gaussian_kernel(7, 1.0).numpy()
        expected = ndimage.correlate(by_hand, kernel, mode="nearest")
        np.testing.assert_allclose(post[i].double().numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sml_post_stays_float32_under_autocast(dtype):
    torch.manual_seed(0)
    segnet = freeze(SegNet(3, 12, width_mult=0.125))
    cfg = MethodConfig(class_stats=toy_class_stats(12, 8))
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        batch = EvalBatch(images, segnet, None, segnet(images, return_feat=True), ())
        sml, post = METHODS["sml"].fn(batch, cfg), METHODS["sml_post"].fn(batch, cfg)
        pred = batch.feats[-1].argmax(dim=1)
    assert post.dtype == torch.float32
    expected = dilated_smoothing(suppress_boundaries(sml.float(), pred))  # outside autocast
    torch.testing.assert_close(post, expected, rtol=0, atol=1e-6)
