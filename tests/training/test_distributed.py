"""DDP on CPU with gloo: two processes give the metrics of one; torchrun runs main.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from obsnet.data.loaders import build_dataset, build_loader
from obsnet.data.specs import SPECS
from obsnet.data.synthetic import generate
from obsnet.evaluate import evaluate
from obsnet.methods import MethodConfig
from obsnet.models.obsnet import Obsnet_Seg
from obsnet.models.segnet import SegNet, freeze
from tests.helpers import ROOT
from tests.helpers.runner import main_py, spawn

SIZE = (32, 48)


def networks():
    torch.manual_seed(0)
    return freeze(SegNet(3, 12, width_mult=0.0625)), Obsnet_Seg(3, 1, width_mult=0.0625).eval()


def run_evaluation(root, distributed: bool) -> dict:
    spec = SPECS["Synthetic"]
    dataset = build_dataset(spec, root, "test_ood", SIZE)
    loader = build_loader(dataset, 2, train=False, distributed=distributed)
    segnet, obsnet = networks()
    results, _, _ = evaluate(segnet, obsnet, loader, ["obsnet", "mcp"], spec, torch.device("cpu"),
                             MethodConfig(), 12, "test_ood", progress=False)
    return results


def _worker(rank, world, root, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = run_evaluation(root, distributed=True)
        if rank == 0:
            out.write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def strip_times(results: dict) -> dict:
    for entry in results["methods"].values():
        entry.pop("ms_per_image")
    return results


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    generate(root / "data", seed=0, n_train=6, n_val=3, n_test=5)  # 5 images: uneven shards
    return root


def test_two_gloo_processes_give_the_metrics_of_one(data, tmp_path):
    out = tmp_path / "ddp.json"
    spawn(_worker, args=(2, data / "data", tmp_path / "init", out), nprocs=2)
    two = strip_times(json.loads(out.read_text()))
    one = strip_times(json.loads(json.dumps(run_evaluation(data / "data", distributed=False))))
    assert two["n_images"] == one["n_images"] == 5  # every image once, no padding
    assert two["segnet"]["miou"] == pytest.approx(one["segnet"]["miou"], abs=1e-12)
    for name in one["methods"]:
        for block in ("ood", "error"):
            # Each rank refines the score bins its own pixels fill, the single run those of all
            # pixels: the two agree within the meter's promise (1e-4 of scikit-learn on AUROC
            # and AP, 1e-3 on FPR95), not bit for bit.
            for key, value in one["methods"][name][block].items():
                tol = 1e-3 if key == "fpr95" else 1e-4
                assert two["methods"][name][block][key] == pytest.approx(value, abs=tol), key


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", str(ROOT / "main.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_trains_and_tests_like_one_process(data):
    common = ["--data", "Synthetic", "--dset_folder", str(data / "data"), "--size", "32", "48",
              "--width_mult", "0.0625", "--bsize", "2", "--seed", "0", "--segnet_file",
              str(data / "segnet.pth"), "--obsnet_file", str(data / "obsnet")]
    seg = torchrun(*common, "--train_segnet", "--epoch", "1", "--tboard", str(data / "l1"))
    assert seg.returncode == 0, seg.stderr[-3000:]
    obs = torchrun(*common, "--epoch", "1", "--adv", "min_random_patch", "--tboard", str(data / "l2"))
    assert obs.returncode == 0, obs.stderr[-3000:]
    assert obs.stdout.count("ObsNet epoch 0:") == 1  # only rank 0 prints
    test = torchrun(*common, "--test_only", "--test_multi", "obsnet,mcp", "--tboard", str(data / "l3"))
    assert test.returncode == 0, test.stderr[-3000:]
    single = main_py(*common, "--test_only", "--test_multi", "obsnet,mcp", "--tboard", str(data / "l4"))
    assert single.returncode == 0, single.stderr
    two = strip_times(json.loads((data / "l3" / "results_test_ood.json").read_text()))
    one = strip_times(json.loads((data / "l4" / "results_test_ood.json").read_text()))
    assert two["n_images"] == one["n_images"] == 5
    assert two["methods"]["obsnet"]["ood"]["auroc"] == pytest.approx(
        one["methods"]["obsnet"]["ood"]["auroc"], abs=1e-9)


def _unlabelled_batch_worker(rank, world, init_file, out):
    """Train a tiny SegNet one epoch of two batches under DDP; rank 1's first batch has every
    pixel ignored. Writes this rank's weights and epoch summary to ``out/rank{rank}.pt``."""
    from datetime import timedelta

    from torch.nn.parallel import DistributedDataParallel

    from obsnet.train import SegNetJob, train_segnet_epoch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        segnet = DistributedDataParallel(SegNet(3, 12, width_mult=0.0625))
        generator = torch.Generator().manual_seed(rank)
        batches = [(torch.rand(2, 3, *SIZE, generator=generator),
                    torch.randint(0, 12, (2, *SIZE), generator=generator)) for _ in range(2)]
        if rank == 1:
            batches[0][1].fill_(255)
        optimizer = torch.optim.SGD(segnet.parameters(), lr=0.1, momentum=0.9)
        summary = train_segnet_epoch(SegNetJob(model=segnet, loader=batches, optimizer=optimizer,
                                               device=torch.device("cpu"), progress=False,
                                               nclass=12), 0)
        weights = {n: p.detach() for n, p in segnet.module.named_parameters()}  # BN stats: per rank
        torch.save({"weights": weights, "summary": summary},
                   out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_batch_with_every_pixel_ignored_on_one_rank_keeps_the_ranks_in_step(tmp_path):
    """Skipping the batch on rank 1 alone would leave rank 0 waiting in the gradient
    all-reduce (a hang, here a gloo timeout); instead both ranks step twice, identically."""
    spawn(_unlabelled_batch_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["summary"]["unlabelled_batches"] for r in ranks] == [0, 1]
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    assert all(torch.isfinite(w).all() for w in ranks[0]["weights"].values())
    # the mean loss is over the 3 labelled batches of both ranks, not 4
    assert ranks[0]["summary"]["loss"] == ranks[1]["summary"]["loss"] > 0
