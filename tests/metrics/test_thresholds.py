"""Operating points fixed before the test (obsnet/metrics/risk.py, obsnet/thresholds.py)
against numpy brute force on the raw scores, and main.py --fit_threshold end to end."""
import json

import numpy as np
import pytest
import torch

from obsnet.metrics.ood import OODMeter, bin_edge_scores
from obsnet.metrics.risk import (ImageCounts, conformal_tpr_threshold, fit_risk_threshold,
                                 fit_tpr_threshold, image_accepted_correct, rates_at)
from obsnet.thresholds import thresholds_path
from tests.helpers.runner import TINY, main_py, paths


def meter_of(scores, errors) -> OODMeter:
    meter = OODMeter()
    meter.update(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(errors))
    return meter


def coarse_edges(scores: np.ndarray) -> np.ndarray:
    """Every coarse-bin upper edge of the scores present (brute force, per pixel)."""
    keys = np.asarray(scores, np.float32).view(np.uint32).astype(np.uint64)
    negative = (keys >> 31) == 1
    ordered = np.where(negative, (~keys) & 0xFFFFFFFF, keys | (1 << 31))
    return np.unique(bin_edge_scores((ordered >> 12) * 4096 + 4095))


def brute_rates(t, scores, errors, anomaly=None):
    s = np.asarray(scores, np.float32)
    accept = s <= np.float32(t)
    correct = ~errors
    out = {"accepted_correct": (accept & correct).sum() / correct.sum(),
           "caught_errors": (~accept & errors).sum() / errors.sum(),
           "selective_risk": (accept & errors).sum() / accept.sum(),
           "coverage": accept.mean(),
           "false_alarms_per_mpx": 1e6 * (~accept & correct).sum() / len(s)}
    if anomaly is not None:
        out["caught_anomalies"] = (~accept & anomaly).sum() / anomaly.sum()
    return out


SCORES = {
    "distinct": lambda r: r.normal(size=5000).astype(np.float32),
    "ties": lambda r: (r.integers(0, 30, 5000) / 7).astype(np.float32),
    "saturated": lambda r: (1 - r.integers(0, 50, 5000) * 1e-7).astype(np.float32),
    "float16": lambda r: r.normal(size=5000).astype(np.float16).astype(np.float32),
}


@pytest.mark.parametrize("case", sorted(SCORES))
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_tpr_threshold_is_the_smallest_edge_meeting_the_target(case, target):
    rng = np.random.default_rng(3)
    scores = SCORES[case](rng)
    errors = rng.random(5000) < 1 / (1 + np.exp(-2 * scores.astype(np.float64) + 1))
    table = meter_of(scores, errors).coarse_table()
    t = fit_tpr_threshold(table, target)
    shares = [(scores[~errors] <= e).mean() for e in coarse_edges(scores)]
    want = coarse_edges(scores)[np.argmax(np.array(shares) >= target - 1e-12)]
    assert t == want
    got = rates_at(t, table)
    for key, value in brute_rates(t, scores, errors).items():
        assert got[key] == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("target", [0.0, 0.05, 0.2, 0.9])
def test_risk_threshold_is_the_largest_edge_under_the_risk(target):
    rng = np.random.default_rng(4)
    scores = rng.normal(size=4000).astype(np.float32)
    errors = rng.random(4000) < 1 / (1 + np.exp(-3 * scores.astype(np.float64)))
    t = fit_risk_threshold(meter_of(scores, errors).coarse_table(), target)
    ok = [e for e in coarse_edges(scores) if errors[scores <= e].mean() <= target]
    assert t == (max(ok) if ok else float("-inf"))


def test_thresholds_apply_exactly_to_another_meter():
    """A threshold fitted on one split counts exactly on another, whose bins were refined
    differently (a saturated pile in one, spread scores in the other)."""
    rng = np.random.default_rng(5)
    fit_scores = np.r_[np.full(3000, 0.25, np.float32), rng.random(3000).astype(np.float32)]
    fit_errors = rng.random(6000) < 0.3
    t = fit_tpr_threshold(meter_of(fit_scores, fit_errors).coarse_table(), 0.8)
    scores = rng.random(7000).astype(np.float32) * 0.5
    errors, anomaly = rng.random(7000) < 0.2, rng.random(7000) < 0.05
    ood = OODMeter()
    ood.update(torch.from_numpy(scores), torch.from_numpy(anomaly))
    got = rates_at(t, meter_of(scores, errors).coarse_table(), ood.coarse_table())
    for key, value in brute_rates(t, scores, errors, anomaly).items():
        assert got[key] == pytest.approx(value, abs=1e-12)


def image_set(rng, n, pixels=200):
    """n images: scores, errors (the segmenter's wrong pixels), as B×1×P tensors."""
    scores = rng.normal(size=(n, 1, pixels)).astype(np.float32)
    errors = rng.random((n, 1, pixels)) < 1 / (1 + np.exp(-2 * scores.astype(np.float64)))
    return torch.from_numpy(scores), torch.from_numpy(errors)


def counts_of(scores, errors) -> ImageCounts:
    counts = ImageCounts()
    counts.update(scores, errors, torch.ones_like(errors))
    return counts


def test_conformal_threshold_against_brute_force():
    rng = np.random.default_rng(6)
    scores, errors = image_set(rng, 30)
    counts = counts_of(scores, errors)
    t, bound = conformal_tpr_threshold(counts, 0.9)
    s, e = scores.numpy()[:, 0], errors.numpy()[:, 0]
    n, alpha = len(s), 0.1

    def loss(c):  # per image: share of correct pixels above c
        return np.array([((si > c) & ~ei).sum() / (~ei).sum() for si, ei in zip(s, e)])
    candidates = counts.edges()
    feasible = [c for c in candidates if n / (n + 1) * loss(c).mean() + 1 / (n + 1) <= alpha]
    assert t == min(feasible)
    assert bound == pytest.approx(n / (n + 1) * loss(t).mean() + 1 / (n + 1))
    assert image_accepted_correct(counts, t) == pytest.approx(1 - loss(t).mean())
    assert np.isnan(conformal_tpr_threshold(counts_of(*image_set(rng, 5)), 0.9)[0])  # n < 9


def test_conformal_guarantee_holds_in_expectation():
    """Draw exchangeable images, fit on 20, test on a 21st: the mean share of its correct
    pixels with an alarm stays under alpha (and the pooled threshold's does not promise it)."""
    rng = np.random.default_rng(8)
    losses = []
    for _ in range(300):
        scale = rng.uniform(0.5, 2.0, size=21)  # images differ: some much more confident
        scores, errors = image_set(rng, 21, pixels=60)
        scores = scores * torch.from_numpy(scale.astype(np.float32))[:, None, None]
        t, _ = conformal_tpr_threshold(counts_of(scores[:20], errors[:20]), 0.8)
        s, e = scores[20, 0].numpy(), errors[20, 0].numpy()
        losses.append(((s > t) & ~e).sum() / max((~e).sum(), 1))
    assert np.mean(losses) <= 0.2 + 3 * np.std(losses) / np.sqrt(len(losses))


# ------------------------------------------------------------------------ the command line

def test_fit_threshold_then_test_reports_the_frozen_rates(run_dir):
    root = run_dir
    if not (root / "obsnet" / "best.pth").is_file():
        obs = main_py(*TINY, *paths(root), "--epoch", "1", "--lr", "0.01")
        assert obs.returncode == 0, obs.stderr
    fit = [*TINY, *paths(root), "--fit_threshold", "--test_multi", "obsnet,mcp",
           "--target_tpr", "0.9", "--target_risk", "0.3", "--tboard", str(root / "fit_logs")]
    done = main_py(*fit)
    assert done.returncode == 0, done.stderr
    path = thresholds_path(root / "obsnet")
    record = json.loads(path.read_text())
    assert record["split"] == "val" and set(record["methods"]) == {"obsnet", "mcp"}
    assert set(record["methods"]["obsnet"]) == {"tpr", "risk", "conformal_tpr"}
    assert record["methods"]["mcp"]["tpr"]["fit"]["accepted_correct"] >= 0.9
    again = main_py(*fit)  # an earlier file: --overwrite needed
    assert again.returncode == 2 and "add --overwrite to replace it" in again.stderr
    anomalies = main_py(*fit, "--overwrite", "--test_split", "test_ood")
    assert anomalies.returncode == 1 and "holds" in anomalies.stderr and "anomaly" in anomalies.stderr
    assert json.loads(path.read_text()) == record  # the refused run left it as it was

    # on the split it was fitted on, the frozen thresholds give back the fit's rates exactly
    test = main_py(*TINY, *paths(root), "--test_only", "--test_multi", "obsnet,mcp",
                   "--test_split", "val", "--tboard", str(root / "val_logs"))
    assert test.returncode == 0, test.stderr
    assert "thresholds fixed on val" in test.stdout and "Err FPR95 (test-tuned)" in test.stdout
    results = json.loads((root / "val_logs" / "results_val.json").read_text())
    for name in ("obsnet", "mcp"):
        for kind, point in results["methods"][name]["frozen"].items():
            for key, value in point["fit"].items():
                assert point["test"][key] == pytest.approx(value, abs=1e-12), (name, kind, key)
    assert (root / "val_logs" / "risk_coverage_val.png").is_file()


def test_a_foreign_or_mismatched_thresholds_file_is_refused(run_dir, tmp_path):
    root = run_dir
    if not (root / "obsnet" / "best.pth").is_file():
        assert main_py(*TINY, *paths(root), "--epoch", "1").returncode == 0
    path = thresholds_path(root / "obsnet")
    backup = path.read_bytes() if path.is_file() else None
    try:
        path.write_text('{"note": "the user\'s"}')
        done = main_py(*TINY, *paths(root), "--fit_threshold", "--overwrite", "--tboard",
                       str(tmp_path / "logs"))
        assert done.returncode == 2 and "was not written by" in done.stderr
        assert path.read_text() == '{"note": "the user\'s"}'
        test = main_py(*TINY, *paths(root), "--test_only", "--tboard", str(tmp_path / "t"))
        assert test.returncode == 2 and "not a thresholds file" in test.stderr
        record = {"written_by": "main.py --fit_threshold", "segmenter": "0" * 16, "methods": {}}
        path.write_text(json.dumps(record))  # no split, images, targets nor settings
        test = main_py(*TINY, *paths(root), "--test_only", "--tboard", str(tmp_path / "u"))
        assert test.returncode == 2 and "its split, images, targets" in test.stderr
        settings = {k: None for k in ("T", "Temp", "sampling_score", "gauss_lambda", "odin_eps",
                                      "odin_temp", "ensemble")}
        record |= {"split": "val", "images": 4, "targets": {"tpr": 0.9, "risk": None},
                   "observer": None, "settings": settings}
        path.write_text(json.dumps(record))
        test = main_py(*TINY, *paths(root), "--test_only", "--tboard", str(tmp_path / "v"))
        assert test.returncode == 2 and "fitted for another segmenter" in test.stderr
    finally:
        path.unlink()
        if backup is not None:
            path.write_bytes(backup)


@pytest.mark.parametrize("flags,message", [
    (["--fit_threshold", "--test_only"], "--fit_threshold is a stage of its own"),
    (["--fit_threshold", "--target_tpr", "0"], "--target_tpr must be in (0, 1]"),
    (["--fit_threshold", "--target_risk", "1"], "--target_risk must be in [0, 1)"),
])
def test_bad_threshold_flags(flags, message, tmp_path):
    done = main_py(*TINY, *paths(tmp_path), *flags)
    assert done.returncode == 2 and message in done.stderr


@pytest.fixture(scope="module")
def fitted(run_dir):
    """``run_dir`` with an observer and its thresholds (tpr and conformal_tpr)."""
    root = run_dir
    if not (root / "obsnet" / "best.pth").is_file():
        assert main_py(*TINY, *paths(root), "--epoch", "1").returncode == 0
    done = main_py(*TINY, *paths(root), "--fit_threshold", "--target_tpr", "0.7", "--overwrite",
                   "--tboard", str(root / "fit2"))  # 4 val images: conformal needs alpha >= 1/5
    assert done.returncode == 0, done.stderr
    return root, json.loads(thresholds_path(root / "obsnet").read_text())


def test_inference_writes_the_alarm_mask_of_the_frozen_threshold(fitted, tmp_path):
    import shutil

    from PIL import Image

    from obsnet import inference
    root, record = fitted
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((root / "data" / "test").glob("*.png"))[:2]:
        shutil.copy(source, images / source.name)
    argv = ["--segnet_file", str(root / "segnet.pth"), "--obsnet_file", str(root / "obsnet"),
            "--img_folder", str(images), "--out", str(tmp_path / "out"), "--threshold", "tpr",
            "--size", "32", "48"]
    assert inference.main(argv) == 0
    args = inference.build_parser().parse_args(argv)
    spec, adopted = inference.adopt_recorded_preset(vars(args))
    vars(args).update(adopted)
    nets = inference.load_networks(args, spec)
    assert nets.alarm_logit == record["methods"]["obsnet"]["tpr"]["threshold"]
    for image_file in sorted(images.iterdir()):
        image = inference.read_image(image_file).as_subclass(torch.Tensor)
        _, logit = inference.observe(nets.segnet, nets.obsnet, inference.prepare([image], nets.size, spec))
        want = torch.nn.functional.interpolate((logit > nets.alarm_logit)[None].float(),
                                               size=tuple(image.shape[-2:]), mode="nearest")[0, 0]
        got = np.asarray(Image.open(tmp_path / "out" / f"{image_file.name}.alarm.png"))
        assert set(np.unique(got)) <= {0, 255}
        np.testing.assert_array_equal(got == 255, want.numpy() > 0)


def test_onnx_alarm_output_follows_the_threshold(fitted, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from obsnet import export
    root, record = fitted
    out = tmp_path / "observer.onnx"
    assert export.main(["--segnet_file", str(root / "segnet.pth"), "--obsnet_file",
                        str(root / "obsnet"), "--out", str(out), "--size", "32", "48",
                        "--threshold", "conformal_tpr"]) == 0
    t = record["methods"]["obsnet"]["conformal_tpr"]["threshold"]
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert float(props["obsnet.alarm_logit"]) == t
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    image = torch.rand(2, 3, 40, 64, generator=torch.Generator().manual_seed(0)).numpy()
    _, prob, alarm = session.run(["logits", "observer_prob", "alarm"], {"image": image})
    assert alarm.dtype == np.uint8 and alarm.shape == prob.shape
    clear = np.abs(prob - 1 / (1 + np.exp(-t))) > 1e-5  # away from the threshold itself
    np.testing.assert_array_equal(alarm[clear] == 1, prob[clear] > 1 / (1 + np.exp(-t)))


def test_the_file_is_found_however_the_observer_is_named(tmp_path):
    folder = tmp_path / "obs"
    assert thresholds_path(folder) == folder / "best.thresholds.json"  # not made yet
    folder.mkdir()
    (folder / "best.pth").write_bytes(b"")
    assert thresholds_path(folder) == thresholds_path(folder / "best.pth") \
        == thresholds_path(f"{folder}/") == folder / "best.thresholds.json"
    assert thresholds_path(tmp_path / "mine.pt") == tmp_path / "mine.thresholds.json"


def test_thresholds_of_changed_scores_are_skipped_with_a_warning(fitted, tmp_path):
    """Another --T for mc_dropout, another observer fingerprint (retrained, or calibrated:
    ``test_a_calibration_changes_the_observer_fingerprint``) for obsnet: only those
    methods' frozen rates go, each said in a warning; the others are still reported."""
    root, _ = fitted
    fit = main_py(*TINY, *paths(root), "--fit_threshold", "--overwrite", "--target_tpr", "0.7",
                  "--test_multi", "obsnet,mcp,mc_dropout", "--T", "2",
                  "--tboard", str(tmp_path / "fit"))
    assert fit.returncode == 0, fit.stderr
    test = main_py(*TINY, *paths(root), "--test_only", "--test_multi", "obsnet,mcp,mc_dropout",
                   "--T", "3", "--tboard", str(tmp_path / "t1"))
    assert test.returncode == 0, test.stderr
    assert "mc_dropout's thresholds were fitted with other --T: not reported" in test.stderr
    results = json.loads((tmp_path / "t1" / "results_test_ood.json").read_text())
    assert "frozen" not in results["methods"]["mc_dropout"]
    assert {"obsnet", "mcp"} <= {n for n, e in results["methods"].items() if "frozen" in e}
    path = thresholds_path(root / "obsnet")  # as if the observer were retrained or calibrated
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record | {"observer": "f" * len(record["observer"])}))
    test = main_py(*TINY, *paths(root), "--test_only", "--test_multi", "obsnet,mcp",
                   "--tboard", str(tmp_path / "t2"))
    assert test.returncode == 0, test.stderr
    assert "obsnet's thresholds were fitted for another observer (or calibration)" in test.stderr
    results = json.loads((tmp_path / "t2" / "results_test_ood.json").read_text())
    assert "frozen" not in results["methods"]["obsnet"] and "frozen" in results["methods"]["mcp"]


def test_a_calibration_changes_the_observer_fingerprint():
    from obsnet.models.calibration import CalibratedObserver
    from obsnet.models.checkpoint import weights_fingerprint
    from obsnet.models.obsnet import Obsnet_Seg
    observer = Obsnet_Seg(3, 1, width_mult=0.0625)
    prints = {weights_fingerprint(observer),
              weights_fingerprint(CalibratedObserver(observer, 1.5, -0.5, {})),
              weights_fingerprint(CalibratedObserver(observer, 1.5, -0.25, {}))}
    assert len(prints) == 3


def test_a_figure_not_drawn_again_is_withdrawn(fitted, tmp_path):
    """A test whose methods give no probability of error leaves no reliability diagram of an
    earlier test of the split beside its new results."""
    root, _ = fitted
    logs = tmp_path / "logs"
    first = main_py(*TINY, *paths(root), "--test_only", "--test_multi", "mcp", "--tboard", str(logs))
    assert first.returncode == 0 and (logs / "reliability_test_ood.png").is_file()
    again = main_py(*TINY, *paths(root), "--test_only", "--test_multi", "entropy", "--overwrite",
                    "--tboard", str(logs))
    assert again.returncode == 0, again.stderr
    assert not (logs / "reliability_test_ood.png").exists()
    assert (logs / "risk_coverage_test_ood.png").is_file()
    assert "reliability_test_ood.png" not in json.loads((logs / ".obsnet-written.json").read_text())["files"]
