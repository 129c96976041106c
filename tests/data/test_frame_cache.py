"""--cache_frames: frames decoded once and kept in memory give the same batches as reading
the files, with workers too, epoch after epoch (the cache is never written by a transform)."""
import pytest
import torch

from obsnet.data.errors import DatasetError
from obsnet.data.loaders import build_dataset, build_loader
from tests.helpers.camvid import SPEC, make_camvid


def _batches(root, train: bool, cached: bool, workers: int, epochs: int = 2) -> list:
    """Every batch of ``epochs`` epochs of one loader (the loader's seed fixes the shuffles and
    the augmentations; without workers they draw from the global generator, seeded here)."""
    torch.manual_seed(0)
    dataset = build_dataset(SPEC, root, "train" if train else "val", SPEC.size, train=train,
                            scale_jitter=0.5 if train else 0.0)
    if cached:
        dataset.cache_frames(progress=False)
        assert dataset.frames is not None and len(dataset.frames) == len(dataset)
    loader = build_loader(dataset, 2, train=train, num_workers=workers, seed=3)
    out = []
    for epoch in range(epochs):
        loader.generator.manual_seed(100 + epoch)  # as runtime.set_epoch
        out += [(images.clone(), labels.clone()) for images, labels in loader]
    return out


@pytest.mark.parametrize("train,workers", [(True, 0), (False, 0), (True, 2)])
def test_cached_and_uncached_loaders_give_identical_batches(tmp_path, train, workers):
    root = make_camvid(tmp_path / "camvid")
    plain = _batches(root, train, cached=False, workers=workers)
    cached = _batches(root, train, cached=True, workers=workers)
    assert len(plain) == len(cached) > 0
    for (pi, pl), (ci, cl) in zip(plain, cached):
        assert torch.equal(pi, ci) and torch.equal(pl, cl)


def test_cache_skips_the_files_and_keeps_a_bad_frame_error(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    dataset = build_dataset(SPEC, root, "train", SPEC.size)
    bad = dataset.samples[1].label
    bad.write_bytes(b"not a png")
    dataset.cache_frames(progress=False)
    for pair in dataset.samples:  # the cache reads nothing more from the files
        pair.image.unlink()
    image, label = dataset[0]
    assert image.shape[-2:] == label.shape == SPEC.size
    with pytest.raises(DatasetError, match="cannot be read"):
        dataset[1]


def test_main_py_has_the_flags():
    from obsnet.cli import build_parser
    assert build_parser().parse_args(["--cache_frames"]).cache_frames
    assert not build_parser().parse_args([]).cache_frames
    assert build_parser().parse_args(["--cudnn_benchmark"]).cudnn_benchmark


def test_cudnn_benchmark_keeps_the_seed_and_lets_cudnn_choose():
    from obsnet.utils import seed_everything
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled())
    try:
        seed_everything(5)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        first = torch.rand(3)
        seed_everything(5, fastest_kernels=True)
        assert torch.equal(torch.rand(3), first)  # seeded as before
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2])
