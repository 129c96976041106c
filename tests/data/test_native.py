"""Evaluation at each label's resolution: padded batches of labels and maps brought to them."""
import numpy as np
import torch
from PIL import Image

from obsnet.data.native import LabelGrid, collate_native


def _items():
    rng = np.random.default_rng(0)
    return [(torch.rand(3, 8, 12), torch.from_numpy(rng.integers(0, 3, (h, w))).long())
            for h, w in ((10, 20), (16, 14), (8, 12))]


def test_collate_pads_labels_with_the_ignore_id_and_keeps_sizes():
    items = _items()
    images, labels, sizes = collate_native(items, pad_value=255)
    assert images.shape == (3, 3, 8, 12) and labels.shape == (3, 16, 20)
    assert sizes.tolist() == [[10, 20], [16, 14], [8, 12]]
    for i, (_, label) in enumerate(items):
        h, w = label.shape
        assert torch.equal(labels[i, :h, :w], label)
        assert (labels[i, h:] == 255).all() and (labels[i, :, w:] == 255).all()


def test_grid_scores_classes_frames_against_pil_and_by_hand():
    items = _items()
    images, labels, grid = LabelGrid.of_batch(collate_native(items, pad_value=255))
    maps = torch.rand(3, 8, 12)
    scores = grid.scores(maps.half())  # autocast's float16 comes back as float32
    assert scores.dtype == torch.float32 and scores.shape == (3, 16, 20)
    for i, frame in enumerate(grid.frames(scores)):
        h, w = items[i][1].shape
        assert frame.shape == (h, w)
        # PIL's bilinear upsampling: an independent reference (half-pixel centres)
        small = maps[i].half().float().numpy()
        ref = np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR))
        np.testing.assert_allclose(frame, ref, atol=1e-5)
        assert (scores[i, h:] == 0).all() and (scores[i, :, w:] == 0).all()
    pred = torch.arange(8 * 12).reshape(1, 8, 12).repeat(3, 1, 1)
    classes = grid.classes(pred)
    assert classes[2, :8, :12].equal(pred[2]) and (classes[2, 8:] == -1).all()
    # nearest from 8x12 to 16x14: row r reads row r // 2, column c reads floor(c * 12 / 14)
    cols = (np.arange(14) * 12 / 14).astype(int)
    expected = pred[1].numpy()[np.arange(16)[:, None] // 2, cols[None, :]]
    np.testing.assert_array_equal(classes[1, :16, :14].numpy(), expected)
    back = grid.to_size(labels, (8, 12))
    assert back.shape == (3, 8, 12) and back[2].equal(items[2][1])
    assert (back != 255).all()  # each frame's own part only: no padding read


def test_grid_without_sizes_is_the_identity():
    images, labels, grid = LabelGrid.of_batch((torch.rand(2, 3, 4, 5), torch.zeros(2, 4, 5)))
    maps = torch.rand(2, 4, 5)
    assert grid.scores(maps) is not None and torch.equal(grid.scores(maps), maps)
    assert grid.classes(labels) is labels and grid.to_size(labels, (9, 9)) is labels
    assert [f.shape for f in grid.frames(maps)] == [(4, 5), (4, 5)]
