"""The benchmarks package: exact references, memory sampling, timings' shape, the report."""
import argparse
import copy
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks import attack_precision, eval_memory, inference, metrics, report, train_step
from benchmarks import run as bench_run
from benchmarks.common import MB, PeakRSS, Spread, machine
from obsnet.attacks import MASKS, AttackConfig, fgsm
from obsnet.metrics.ood import OODMeter
from obsnet.models.blocks import fold_batchnorm
from obsnet.models.segnet import SegNet, freeze

WIDTH = 0.0625
NCLASS = 12


# --------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def metrics_rows():
    return metrics.run(sizes=(20000,), runs=1)


@pytest.fixture(scope="module")
def eval_rows():
    # given out of order: the rows must come back smallest first
    return eval_memory.run((1_000_000, 250_000))


@pytest.fixture(scope="module")
def train_rows():
    return train_step.run([((32, 48), 2, WIDTH, (False,))], runs=1, workers=0)


@pytest.fixture(scope="module")
def inference_out():
    return inference.run((32, 48), WIDTH, mc_passes=3, runs=1)


# --------------------------------------------------------------------------- metrics


def _scores(kind, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    if kind == "continuous":
        s = rng.normal(size=n) + 1.2 * y
    elif kind == "rounded":
        s = np.round(rng.normal(size=n) + 0.8 * y, 1)
    else:  # integers 0..4: every threshold is a big tied block holding both classes
        s = rng.integers(0, 5, n) + (y & (rng.random(n) < 0.4))
        s = np.minimum(s, 4).astype(np.float64)
    assert y.any() and (~y).any()
    return y, s


@pytest.mark.parametrize("kind", ["continuous", "rounded", "integers"])
def test_sorted_exact_matches_sklearn(kind):
    y, s = _scores(kind)
    if kind != "continuous":
        assert len(np.unique(s)) < len(s) // 10  # really tie-heavy
    auroc, ap = metrics.sorted_exact(torch.from_numpy(s), torch.from_numpy(y))
    assert abs(auroc - roc_auc_score(y, s)) < 1e-9
    assert abs(ap - average_precision_score(y, s)) < 1e-9


def test_sorted_exact_float32_scores():
    y, s = _scores("rounded", seed=3)
    s32 = s.astype(np.float32)
    auroc, ap = metrics.sorted_exact(torch.from_numpy(s32), torch.from_numpy(y))
    assert abs(auroc - roc_auc_score(y, s32)) < 1e-9
    assert abs(ap - average_precision_score(y, s32)) < 1e-9


@pytest.mark.parametrize("kind", metrics.DISTRIBUTIONS)
def test_metrics_run_rows(metrics_rows, kind):
    rows = [r for r in metrics_rows if r["scores"] == kind]
    assert [r["method"] for r in rows] == ["scikit-learn", "sort-based exact", "OODMeter"]
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert r["pixels"] == 20000
        assert isinstance(r["seconds"], Spread) and r["seconds"].runs == 1
        assert r["seconds"].median > 0 and r["speedup_vs_sklearn"] > 0
        assert r["peak_mb"] >= 0
    assert by["scikit-learn"]["speedup_vs_sklearn"] == 1.0
    assert by["scikit-learn"]["max_abs_diff"] == 0.0
    assert by["sort-based exact"]["max_abs_diff"] < 1e-9
    assert by["OODMeter"]["max_abs_diff"] < 1e-4  # the narrow spread too (1e-3 wide, at 0.9)
    for r in rows:
        expected = by["scikit-learn"]["seconds"].median / r["seconds"].median
        assert r["speedup_vs_sklearn"] == pytest.approx(expected)


def test_narrow_scores_are_narrow():
    scores, positive = metrics.scores_and_labels(20000, kind="narrow")
    assert scores.dtype == torch.float32 and 0.08 < positive.float().mean() < 0.12
    assert (scores.max() - scores.min()) / scores.mean() < 1e-2


# --------------------------------------------------------------------------- common


def test_peak_rss_sees_an_allocation():
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("PeakRSS reads the current RSS from /proc/self/statm (Linux only)")
    with PeakRSS() as mem:
        big = torch.ones(50_000_000)  # 200 MB, every page written
        time.sleep(0.05)  # many sampling intervals while it is held
        del big
    assert mem.start > 0 and mem.peak >= mem.start
    assert mem.above_start >= 150 * MB
    assert mem.above_start == mem.peak - mem.start


def test_spread():
    s = Spread.of([3, 1, 2])
    assert (s.median, s.low, s.high, s.runs) == (2, 1, 3, 3)
    text = s.text()
    assert "2.0" in text and "1.0–3.0" in text and "n=3" in text
    assert Spread.of(iter([0.5])).text(2) == "0.50"
    ms = Spread.of([0.003, 0.001, 0.002]).scaled(1000)
    assert (ms.median, ms.low, ms.high, ms.runs) == pytest.approx((2, 1, 3, 3))
    assert isinstance(ms, Spread)


# --------------------------------------------------------------------------- eval memory


def test_eval_memory_rows(eval_rows):
    rows = eval_rows
    assert [r["pixels"] for r in rows] == [250_000, 1_000_000]
    assert rows[0]["growth_mb"] == 0
    for r in rows:
        assert r["methods"] == len(eval_memory.METHODS)
        assert r["peak_rss_mb"] > 0 and r["seconds"] > 0
        assert r["growth_mb"] == pytest.approx(r["peak_rss_mb"] - rows[0]["peak_rss_mb"])
    assert rows[1]["growth_mb"] < 500  # a sanity bound, not the flatness target


# --------------------------------------------------------------------------- train step


def _attack_setup():
    torch.manual_seed(1)
    segnet = freeze(SegNet(3, NCLASS, width_mult=WIDTH))
    trainable = copy.deepcopy(segnet).requires_grad_(True)
    images = torch.randn(2, 3, 32, 48).clamp(-2, 2)
    labels = torch.randint(0, NCLASS + 1, (2, 32, 48))  # NCLASS: ignored by the loss
    cfg = AttackConfig("min", "square_patch", 0.05, (12, 16, 4, 8), NCLASS,
                       (0.4, 0.4, 0.4), (0.3, 0.3, 0.3))
    return segnet, trainable, images, labels, cfg


def test_attack_with_weight_grads_matches_fgsm():
    segnet, trainable, images, labels, cfg = _attack_setup()
    torch.manual_seed(7)
    ref_mask = MASKS[cfg.mask](images, labels, cfg)
    reference, _ = fgsm(segnet, images, labels, ref_mask, cfg)
    torch.manual_seed(7)
    attacked = train_step.attack_with_weight_grads(trainable, images, labels, cfg)
    assert attacked.shape == images.shape
    torch.testing.assert_close(attacked, reference, rtol=0, atol=1e-6)  # a flipped sign: 2 eps
    inside = ref_mask.expand_as(images) > 0
    assert inside.any() and (~inside).any()
    assert torch.equal(attacked[~inside], images[~inside])
    assert not torch.allclose(attacked[inside], images[inside])
    assert all(p.grad is None for p in trainable.parameters())
    assert all(p.requires_grad for p in trainable.parameters())


def test_attack_with_weight_grads_leaves_no_weight_grads():
    _, trainable, images, labels, cfg = _attack_setup()
    for p in trainable.parameters():  # stale gradients must go too
        p.grad = torch.ones_like(p)
    train_step.attack_with_weight_grads(trainable, images, labels, cfg)
    assert all(p.grad is None for p in trainable.parameters())


def test_train_step_run(train_rows):
    assert len(train_rows) == 1
    row = train_rows[0]
    assert row["size"] == (32, 48) and row["bsize"] == 2 and row["width"] == WIDTH
    assert row["amp"] is False and row["workers"] == 0
    for part in train_step.PARTS:
        assert isinstance(row[part], Spread), part
        assert row[part].runs == 1 and row[part].median > 0, part
    assert row["step"].median >= row["attack"].median
    parts = ("data_wait", "attack", "segnet_forward", "obsnet_fwd_bwd")
    assert row["step"].median == pytest.approx(sum(row[p].median for p in parts))
    expected = row["attack_weight_grads"].median / row["attack"].median
    assert row["attack_speedup"] == pytest.approx(expected)  # one run: median of one ratio


# --------------------------------------------------------------------------- inference


def test_inference_run(inference_out):
    out = inference_out
    methods = out["methods"]
    assert list(methods) == ["segnet_forward", "obsnet", "mcp", "mc_dropout", "ensemble"]
    assert out["mc_passes"] == 3 and out["size"] == (32, 48) and out["runs"] == 1
    forward = methods["segnet_forward"]
    assert forward["added"] is None and forward["total"].median > 0
    for name in ("obsnet", "mcp", "mc_dropout", "ensemble"):
        assert methods[name]["added"].median > 0, name
        assert methods[name]["total"] > 0, name
    obsnet = methods["obsnet"]
    assert obsnet["total"] == pytest.approx(forward["total"].median + obsnet["added"].median)
    # MC dropout and the ensemble run their own forwards: total is their own time
    assert methods["mc_dropout"]["total"] == methods["mc_dropout"]["added"].median
    for key in ("obsnet_over_segnet_forward", "mc_dropout_over_obsnet_added",
                "mc_dropout_over_obsnet_total"):
        assert out[key] > 0, key
    assert out["obsnet_over_segnet_forward"] == pytest.approx(
        obsnet["added"].median / forward["total"].median)
    assert out["mc_dropout_over_obsnet_total"] == pytest.approx(
        methods["mc_dropout"]["total"] / obsnet["total"])


# --------------------------------------------------------------------------- report


def _meta(quick):
    return {"date": "2024-01-02 03:04 UTC", "command": "python -m benchmarks.run --test",
            "quick": quick, "runs": 1, "machine": machine()}


def _table_after(text, heading):
    lines = text.split("\n")
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_report_markdown(metrics_rows, eval_rows, train_rows, inference_out):
    results = {"metrics": metrics_rows, "eval_memory": eval_rows, "train_step": train_rows,
               "inference": [inference_out], "demo": Spread.of([12.0])}
    expected = report.targets(results)
    assert len(expected) == 7  # metrics 2, eval_memory 1, train_step 2, inference 2
    text = report.markdown(_meta(False), results)
    assert text.startswith("# Benchmark run of 2024-01-02 03:04 UTC")
    assert "`python -m benchmarks.run --test`" in text
    for heading in ("## AUROC + AP on N scores", "## Evaluation pass: peak memory against pixels",
                    "## Observer training step (ms, median (min–max, n))",
                    "## Inference per image (ms)", "## Demo"):
        assert heading in text, heading
    rows = _table_after(text, "## Targets")
    assert rows[0] == ["target", "measured", "met"]
    body = rows[2:]  # after the header and the |---| line
    assert len(body) == len(expected)
    for (target, measured, met), row in zip(expected, body):
        assert row == [target, measured, "yes" if met else "**no**"]
    # the metrics table has one row per implementation
    assert len(_table_after(text, "## AUROC + AP on N scores")) == 2 + len(metrics_rows)

    quick = report.markdown(_meta(True), results)
    assert "## Targets" in quick and "not judged" in quick
    assert _table_after(quick, "## Targets") == []


def _meter_row(pixels, speedup, diff=0.0):
    return {"pixels": pixels, "method": "OODMeter", "speedup_vs_sklearn": speedup,
            "max_abs_diff": diff}


def test_report_targets_judged():
    slow, exact = report.targets({"metrics": [_meter_row(1000, 49.0)]})
    assert slow[2] is False and "1,000" in slow[0] and exact[2] is True
    assert report.targets({"metrics": [_meter_row(1000, 50.0)]})[0][2] is True
    # the largest size is judged, whatever the smaller ones do; the worst error of all sizes
    rows = [_meter_row(1000, 200.0, 2e-4), _meter_row(5000, 10.0),
            {"pixels": 5000, "method": "scikit-learn", "speedup_vs_sklearn": 1.0, "max_abs_diff": 0.0}]
    judged, exact = report.targets({"metrics": rows})
    assert "5,000" in judged[0] and judged[1] == "10x" and judged[2] is False
    assert exact[1] == "2.0e-04" and exact[2] is False
    # the slowest distribution at the largest size is the one judged
    rows = [_meter_row(5000, 80.0), dict(_meter_row(5000, 40.0), scores="narrow")]
    assert report.targets({"metrics": rows})[0][1] == "40x"
    assert report.targets({}) == []
    grow = [{"pixels": 1, "growth_mb": 0.0}, {"pixels": 2, "growth_mb": 150.0}]
    (mem,) = report.targets({"eval_memory": grow})
    assert mem[2] is False


# --------------------------------------------------------------------------- fold_batchnorm


def _count_bn(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_batchnorm_same_outputs():
    torch.manual_seed(2)
    segnet = SegNet(3, NCLASS, width_mult=WIDTH)
    with torch.no_grad():
        for m in segnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    segnet = freeze(segnet)
    assert _count_bn(segnet) > 0
    folded = fold_batchnorm(copy.deepcopy(segnet))
    assert _count_bn(folded) == 0
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref, out = segnet(x, return_feat=True), folded(x, return_feat=True)
    assert len(ref) == len(out) == 10
    for i, (a, b) in enumerate(zip(ref, out)):
        assert a.shape == b.shape, i
        rel = ((a - b).abs().mean() / a.abs().mean()).item()
        assert rel < 1e-5, (i, rel)
    assert torch.equal(ref[-1].argmax(1), out[-1].argmax(1))


def test_fold_batchnorm_leaves_train_mode_alone():
    model = SegNet(3, NCLASS, width_mult=WIDTH).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = _count_bn(model)
    assert fold_batchnorm(model) is model
    assert _count_bn(model) == n_bn > 0
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- OODMeter chunks


def test_oodmeter_chunked_matches_default(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    shape = (7, 11, 130)  # 10,010 pixels: a partial last chunk
    positive = torch.rand(shape, generator=gen) < 0.2
    scores = torch.randn(shape, generator=gen) + 1.5 * positive
    valid = torch.rand(shape, generator=gen) < 0.9
    probs = torch.sigmoid(scores)

    def computed():
        meter = OODMeter()
        meter.update(scores, positive, valid=valid, probs=probs)
        return meter, meter.compute()

    default_meter, default = computed()
    monkeypatch.setattr(OODMeter, "CHUNK", 1000)
    chunked_meter, chunked = computed()
    assert chunked["n_pos"] == int((positive & valid).sum())
    assert chunked["n_pos"] + chunked["n_neg"] == int(valid.sum())
    neg, pos, prob, _ = chunked_meter.table()
    neg0, pos0, prob0, _ = default_meter.table()
    np.testing.assert_array_equal(neg, neg0)
    np.testing.assert_array_equal(pos, pos0)
    np.testing.assert_allclose(prob, prob0, rtol=1e-12, atol=1e-12)
    for key in ("auroc", "ap", "fpr95", "ace", "ece", "n_pos", "n_neg"):
        assert chunked[key] is not None, key
        assert chunked[key] == pytest.approx(default[key], rel=1e-12, abs=1e-12), key


# --------------------------------------------------------------------------- run


def test_run_main_quick_metrics(tmp_path, capsys):
    out = tmp_path / "results"
    assert bench_run.main(["--quick", "--only", "metrics", "--runs", "1", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## AUROC + AP on N scores" in md and "not judged" in md
    assert md in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert data["quick"] is True and data["runs"] == 1
    assert set(data["machine"]) >= {"cpu", "cores", "torch", "python"}
    assert list(data["results"]) == ["metrics"]
    rows = data["results"]["metrics"]
    assert [r["method"] for r in rows] == ["scikit-learn", "sort-based exact", "OODMeter"] * 2
    assert [r["scores"] for r in rows] == ["gaussian"] * 3 + ["narrow"] * 3
    assert all(r["pixels"] == 1_000_000 for r in rows)
    assert set(rows[0]["seconds"]) == {"median", "low", "high", "runs"}


# --------------------------------------------------------------------------- attack precision


def test_attack_precision_rows():
    args = argparse.Namespace(data="Synthetic", dset_folder=None, segnet_file=None, width_mult=WIDTH,
                              size=[32, 48], adv="min_random_patch", epsilon=0.025, bsize=2, batches=1)
    rows = attack_precision.run(args)
    assert list(rows) == list(attack_precision.PRECISIONS)
    assert rows["float32"]["sign_agreement"] == 1.0 and rows["float32"]["moved"] > 0.99
    # the fixed float16 attack steps where float32 does; the mean loss in float16 did not
    assert rows["float16"]["moved"] > 0.99 and rows["float16"]["sign_agreement"] > 0.99
    assert rows["float16, mean loss in autocast"]["moved"] < 0.5
    assert rows["bfloat16"]["moved"] > 0.99
    for r in rows.values():
        assert 0 <= r["flip_rate"] <= 1
