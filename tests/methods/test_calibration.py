"""Platt calibration of the observer (main.py --calibrate, docs/calibration.md): the fit against
scikit-learn, the pixel sample, ECE / ACE / reliability bins against brute-force loops, the
checkpoint entry (checked as data) and where it is applied (--test_only, inference.py, ONNX)."""
import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from obsnet.calibration import PixelSample, fit_platt
from obsnet.data.base import read_image
from obsnet.data.loaders import build_dataset
from obsnet.inference import prepare
from obsnet.data.specs import SPECS
from obsnet.metrics.ood import CALIBRATION_GROUPS, OODMeter
from obsnet.models.calibration import CalibratedObserver, read_calibration
from obsnet.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from obsnet.models.observer_spec import ObserverRequest
from obsnet.models.registry import load_observed
from tests.helpers.runner import TINY, inference_py, main_py, one_line_error, run_paths

SPEC = SPECS["Synthetic"]


def sklearn_platt(z, y, scale=1.0, shift=0.0):
    """(a, b) of an unregularised logistic regression of ``y`` on ``z`` (scikit-learn, fitted
    on ``(z - shift) / scale`` and mapped back)."""
    model = LogisticRegression(C=1e10, tol=1e-12, max_iter=10_000)
    model.fit(((z - shift) / scale)[:, None], y)
    a = float(model.coef_[0, 0]) / scale
    return a, float(model.intercept_[0]) - a * shift


# ----------------------------------------------------------------------------- the fit

@pytest.mark.parametrize("a, b, scale, shift", [(0.5, -1.0, 3.0, 0.0), (2.0, 0.7, 0.5, 0.0),
                                                (0.01, -10.0, 100.0, 1000.0)])
def test_platt_fit_recovers_a_known_sigmoid_and_matches_sklearn(a, b, scale, shift):
    rng = np.random.default_rng(0)
    z = rng.normal(shift, scale, 200_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(a * z + b)))).astype(float)
    fitted = fit_platt(z, y)
    reference = sklearn_platt(z, y, scale, shift)
    assert fitted == pytest.approx(reference, rel=1e-4, abs=1e-4)
    # well specified: the truth within a few standard errors (about 1% here)
    assert fitted[0] == pytest.approx(a, rel=0.05)
    assert abs(fitted[1] + fitted[0] * shift - (b + a * shift)) < 0.05


def test_platt_fit_matches_the_mean_at_its_optimum():
    # d(mean BCE)/db = mean(p - y): at the optimum the mean probability is the error rate
    rng = np.random.default_rng(1)
    z = rng.standard_t(3, 50_000)
    y = (rng.random(z.size) < 0.3).astype(float)  # uninformative logits: a near 0
    a, b = fit_platt(z, y)
    assert np.mean(1 / (1 + np.exp(-(a * z + b)))) == pytest.approx(y.mean(), abs=1e-7)


@pytest.mark.parametrize("z, y, words", [
    ([0.1, 0.2, 0.3], [1, 1, 1], "all errors"),
    ([0.1, 0.2, 0.3], [0, 0, 0], "all correct"),
    ([0.5, 0.5, 0.5], [0, 1, 0], "same logit"),
    ([-2.0, -1.0, 1.0, 2.0], [0, 0, 1, 1], "separate"),
    ([-2.0, -1.0, 1.0, 2.0], [1, 1, 0, 0], "separate")])
def test_platt_fit_refuses_what_has_no_optimum(z, y, words):
    with pytest.raises(ValueError, match=words):
        fit_platt(np.array(z), np.array(y, float))


# ----------------------------------------------------------------------------- the sample

def test_pixel_sample_is_uniform_bounded_and_seeded():
    def sampled(seed):
        sample = PixelSample(size=2000, seed=seed)
        for batch in range(10):  # pixel value = its index in the stream
            values = torch.arange(batch * 1000, (batch + 1) * 1000, dtype=torch.float32)
            valid = values % 7 != 0
            sample.add(values, values % 2 == 0, valid)
        return sample

    sample = sampled(0)
    z, y = sample.arrays()
    assert len(z) == 2000 and sample.seen == sum(1 for i in range(10_000) if i % 7)
    assert len(np.unique(z)) == 2000 and not np.any(z % 7 == 0)  # without replacement, valid only
    assert np.array_equal(y, (z % 2 == 0).astype(float))  # targets stay with their pixels
    per_batch = np.bincount((z // 1000).astype(int), minlength=10)
    assert per_batch.min() > 140 and per_batch.max() < 260  # 200 expected each
    assert np.array_equal(np.sort(sampled(0).arrays()[0]), np.sort(z))
    assert not np.array_equal(np.sort(sampled(1).arrays()[0]), np.sort(z))
    small = PixelSample(size=10)
    small.add(torch.arange(4.0), torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    assert sorted(small.arrays()[0]) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- ECE, ACE, bins

def brute_force_calibration(scores, probs, errors, groups=CALIBRATION_GROUPS):
    """ECE, ACE and ECE's bins by a loop over the distinct scores (each a tie: one prob; a
    tie joins the equal-mass group where its first pixel falls, as OODMeter's thresholds)."""
    total = len(scores)
    ece_bins = np.zeros((3, groups))
    ace_pixels = [[] for _ in range(groups)]
    below = 0
    for s in np.unique(scores):
        at = scores == s
        p = float(probs[at][0])
        g = min(int(np.floor(p * groups)), groups - 1)
        ece_bins[:, g] += [at.sum(), probs[at].astype(np.float64).sum(), errors[at].sum()]
        ace_pixels[min(below * groups // total, groups - 1)].append(at)
        below += int(at.sum())
    ece = sum(abs(ece_bins[1, g] - ece_bins[2, g]) for g in range(groups)) / total
    gaps = []
    for masks in ace_pixels:
        if masks:
            sel = np.any(masks, axis=0)
            gaps.append(abs(probs[sel].astype(np.float64).sum() - errors[sel].sum()) / sel.sum())
    return ece, float(np.mean(gaps)), ece_bins


@pytest.mark.parametrize("case", ["ties_and_saturation", "empty_bins", "calibrated_logits"])
def test_ece_ace_and_reliability_bins_match_a_brute_force_loop(case):
    rng = np.random.default_rng(2)
    if case == "ties_and_saturation":  # big ties, probabilities 0, 1 and within 1e-7 of 1
        probs = rng.choice(np.float32([0.0, 1.0, 1 - 1e-7, 0.5, 0.2, 0.2000001]), 5000)
    elif case == "empty_bins":  # two clusters: most of the 15 groups empty
        probs = np.concatenate([rng.choice(np.linspace(0.01, 0.05, 40), 3000),
                                rng.choice(np.linspace(0.9, 0.93, 20), 500)])
    else:  # logits on a grid of 1/64: distinct scores never share a bin of the meter
        probs = 1 / (1 + np.exp(-np.round(rng.normal(0, 4, 20_000) * 64) / 64))
    probs = probs.astype(np.float32)
    errors = rng.random(len(probs)) < np.clip(probs * 0.8 + 0.05, 0, 1)
    # the score is the logit (a monotone map of the prob): what the obsnet method gives
    with np.errstate(divide="ignore"):
        scores = np.log(probs) - np.log1p(-probs)
    meter = OODMeter()
    meter.update(torch.from_numpy(scores), torch.from_numpy(errors), probs=torch.from_numpy(probs))
    result = meter.compute()
    ece, ace, bins = brute_force_calibration(scores, probs, errors)
    assert result["ece"] == pytest.approx(ece, abs=1e-9)
    assert result["ace"] == pytest.approx(ace, abs=1e-9)
    assert np.allclose(np.stack(meter.reliability()), bins, atol=1e-6)


def test_reliability_is_none_without_probabilities():
    meter = OODMeter()
    meter.update(torch.rand(10), torch.rand(10) < 0.5)
    assert meter.reliability() is None


# ----------------------------------------------------------------------------- the record

@pytest.mark.parametrize("record, words", [
    ({"a": 0.0, "b": 0.0}, "'a' must be > 0"), ({"a": -1.0, "b": 0.0}, "'a' must be > 0"),
    ({"a": float("nan"), "b": 0.0}, "'a' is not a finite number"),
    ({"a": 1.0, "b": float("inf")}, "'b' is not a finite number"),
    ({"a": "1", "b": 0.0}, "'a' is not a finite number"), ({"a": True, "b": 0.0}, "'a'"),
    ({"b": 0.0}, "'a' is not"), ({"a": 1.0, "b": 0.0, "ece_after": float("nan")}, "'ece_after'"),
    ({"a": 1.0, "b": 0.0, "split": 3}, "'split'"), ([1.0, 0.0], "not a mapping")])
def test_bad_recorded_calibration_is_a_checkpoint_error_naming_file_and_entry(record, words):
    with pytest.raises(CheckpointError, match=words) as caught:
        read_calibration({"calibration": record}, "--obsnet_file x/best.pth")
    assert str(caught.value).startswith("--obsnet_file x/best.pth: its 'calibration' entry")


def test_calibrated_observer_is_an_affine_map_of_the_logit(nets):
    segnet, observer = nets
    x = torch.randn(2, 3, 32, 48)
    feats = segnet(x, return_feat=True)
    wrapped = CalibratedObserver(observer, 2.5, -0.75, {})
    with torch.no_grad():
        assert torch.allclose(wrapped(x, feats), 2.5 * observer(x, feats) - 0.75, atol=1e-6)


# ----------------------------------------------------------------------------- main.py

FC = ("fc.weight", "fc.bias")  # the observer's last layer (Obsnet_Seg)


def negate_observer(path):
    """Negate the observer's logit in the checkpoint at ``path`` (its last layer), so that its
    ranking is reversed."""
    checkpoint = load_checkpoint(path)
    for key in FC:
        checkpoint["model"][key] = -checkpoint["model"][key]
    save_checkpoint(path, checkpoint)


def calibrate(root, *extra, obsnet="obsnet"):
    return main_py(*TINY, *run_paths(root, obsnet=obsnet), "--calibrate", *extra)


@pytest.fixture(scope="module")
def trained(small_data):
    """An observer trained one epoch by main.py on small_data, whose logit ranks the val
    split's errors above its correct pixels (negated if training gave the reverse), and
    calibrated by main.py --calibrate (the run's output)."""
    run = main_py(*TINY, *run_paths(small_data), "--epoch", "1")
    assert run.returncode == 0, run.stderr
    shutil.copytree(small_data / "obsnet", small_data / "raw")
    out = calibrate(small_data)
    if out.returncode != 0 and "<= 0" in out.stderr:
        negate_observer(small_data / "obsnet" / "best.pth")
        negate_observer(small_data / "raw" / "best.pth")
        out = calibrate(small_data)
    assert out.returncode == 0, out.stderr
    return small_data, out


def reference_pixels(root):
    """Every scored val pixel's uncalibrated logit and error target, computed here: the
    networks of the checkpoints, the labelled pixels (not 255) of the val split."""
    segnet, observer, _ = load_observed(root / "raw", ObserverRequest(), "segnet", SPEC.nclass,
                                        0.0625, root / "segnet.pth")
    dataset = build_dataset(SPEC, root / "data", SPEC.val_split, (32, 48), train=False)
    logits, errors = [], []
    with torch.no_grad():
        for image, label in (dataset[i] for i in range(len(dataset))):
            feats = segnet(image[None], return_feat=True)
            z = observer.eval()(image[None], feats)[0, 0]
            labelled = (label >= 0) & (label < SPEC.nclass) & (label != SPEC.ignore_id)
            logits.append(z[labelled].double().numpy())
            errors.append((feats[-1][0].argmax(0) != label)[labelled].double().numpy())
    return np.concatenate(logits), np.concatenate(errors)


def test_calibrate_fits_stores_and_reports(trained):
    root, out = trained
    z, y = reference_pixels(root)
    record = load_checkpoint(root / "obsnet" / "best.pth")["calibration"]
    assert record["split"] == "val" and record["pixels"] == record["fit_pixels"] == len(z)
    assert (record["a"], record["b"]) == pytest.approx(sklearn_platt(z, y, z.std(), z.mean()),
                                                       rel=1e-4, abs=1e-4)
    # ECE before and after against the brute-force loop on every pixel
    for key, (a, b) in (("before", (1.0, 0.0)), ("after", (record["a"], record["b"]))):
        probs = (1 / (1 + np.exp(-(a * z.astype(np.float32) + b)))).astype(np.float32)
        ece, ace, _ = brute_force_calibration(z.astype(np.float32), probs, y > 0)
        assert record[f"ece_{key}"] == pytest.approx(ece, abs=1e-5), key
        assert record[f"ace_{key}"] == pytest.approx(ace, abs=1e-5), key
    assert record["ece_after"] < record["ece_before"]
    assert f"ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f}" in out.stdout
    assert "stored in" in out.stdout
    config = json.loads((root / "logs_obsnet" / "config_calibrate.json").read_text())
    assert config["calibrate"] is True and config["test_split"] == "val"


def test_test_only_applies_the_calibration_and_keeps_the_ranking(trained):
    root, _ = trained
    results = {}
    for obsnet in ("raw", "obsnet"):
        out = main_py(*TINY, *run_paths(root, obsnet=obsnet), "--test_only", "--test_split", "val",
                      "--test_multi", "obsnet,mcp")
        assert out.returncode == 0, out.stderr
        logs = root / f"logs_{obsnet}"
        results[obsnet] = json.loads((logs / "results_val.json").read_text())["methods"]
        assert (logs / "reliability_val.png").stat().st_size > 0
        assert "reliability_val.png" in json.loads((logs / ".obsnet-written.json").read_text())["files"]
    raw, calibrated = results["raw"]["obsnet"], results["obsnet"]["obsnet"]
    # a > 0 keeps the order; float32 rounding of a * z + b may tie or split a few scores,
    # within what the meter's coarse bins allow (auroc_bound) and its stated 1e-4 elsewhere
    bound = raw["auroc_bound"] + calibrated["auroc_bound"] + 1e-9
    assert abs(calibrated["error"]["auroc"] - raw["error"]["auroc"]) <= bound
    for key in ("aupr_error", "aupr_success", "fpr95"):
        assert calibrated["error"][key] == pytest.approx(raw["error"][key], abs=1e-4), key
    record = calibrated["calibration"]
    assert "calibration" not in raw
    assert raw["error"]["ece"] == pytest.approx(record["ece_before"], abs=1e-9)
    assert calibrated["error"]["ece"] == pytest.approx(record["ece_after"], abs=1e-9)
    assert calibrated["error"]["ace"] == pytest.approx(record["ace_after"], abs=1e-9)
    assert results["obsnet"]["mcp"]["error"] == pytest.approx(results["raw"]["mcp"]["error"])


def test_calibrate_refusals_are_one_line(trained, tmp_path):
    root, _ = trained
    again = calibrate(root)  # calibrated already
    assert again.returncode == 2
    one_line_error(again, "is calibrated already", "--overwrite")
    plain = root / "plain"
    plain.mkdir(exist_ok=True)
    state = load_checkpoint(root / "raw" / "best.pth")["model"]
    save_checkpoint(plain / "best.pth", state)  # the original's format: a bare state_dict
    out = calibrate(root, obsnet="plain")
    assert out.returncode == 2
    one_line_error(out, "records no observer", str(plain / "best.pth"))
    assert load_checkpoint(plain / "best.pth").keys() == state.keys()  # untouched
    shutil.copytree(root / "raw", root / "reversed", dirs_exist_ok=True)
    negate_observer(root / "reversed" / "best.pth")
    out = calibrate(root, obsnet="reversed")
    assert out.returncode != 0
    one_line_error(out, "<= 0", "not stored")
    assert "calibration" not in load_checkpoint(root / "reversed" / "best.pth")
    out = main_py(*TINY, *run_paths(root, obsnet="raw"), "--calibrate", "--test_only")
    assert out.returncode == 2
    one_line_error(out, "--calibrate is a stage of its own")


def test_a_bad_calibration_entry_stops_test_only_in_one_line(trained):
    root, _ = trained
    shutil.copytree(root / "obsnet", root / "bad", dirs_exist_ok=True)
    checkpoint = load_checkpoint(root / "bad" / "best.pth")
    checkpoint["calibration"]["a"] = -2.0
    save_checkpoint(root / "bad" / "best.pth", checkpoint)
    out = main_py(*TINY, *run_paths(root, obsnet="bad"), "--test_only", "--test_split", "val")
    assert out.returncode == 1
    one_line_error(out, str(root / "bad" / "best.pth"), "'calibration' entry", "'a' must be > 0")


def test_calibrate_overwrite_replaces_the_calibration(trained):
    root, _ = trained
    before = load_checkpoint(root / "obsnet" / "best.pth")
    out = calibrate(root, "--overwrite")
    assert out.returncode == 0, out.stderr
    after = load_checkpoint(root / "obsnet" / "best.pth")
    assert after["calibration"] == pytest.approx(before["calibration"])  # same split: same fit
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])


def test_inference_maps_use_the_calibration(trained, tmp_path):
    root, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    dataset = build_dataset(SPEC, root / "data", SPEC.val_split, (32, 48), train=False)
    shutil.copy(dataset.samples[0].image, images / "a.png")
    out = inference_py("--data", "Synthetic", "--segnet_file", str(root / "segnet.pth"),
                       "--obsnet_file", str(root / "obsnet"), "--img_folder", str(images),
                       "--out", str(tmp_path / "out"), "--width_mult", "0.0625", "--size", "32", "48")
    assert out.returncode == 0, out.stderr
    written = np.load(tmp_path / "out" / "a.png.npy").astype(np.float64)
    # the map computed here: the uncalibrated observer, then sigmoid(a * logit + b)
    segnet, raw, _ = load_observed(root / "raw", ObserverRequest(), "segnet", SPEC.nclass, 0.0625,
                                   root / "segnet.pth")
    batch = prepare([read_image(images / "a.png").as_subclass(torch.Tensor)], (32, 48), SPEC)
    record = load_checkpoint(root / "obsnet" / "best.pth")["calibration"]
    with torch.no_grad():
        logit = raw.eval()(batch, segnet(batch, return_feat=True))[0, 0].double()
    expected = torch.sigmoid(record["a"] * logit + record["b"]).numpy()
    assert written.shape == expected.shape
    assert np.abs(written - expected).max() < 1e-3  # float16 maps
    assert np.abs(written - torch.sigmoid(logit).numpy()).max() > 1e-2  # not the raw map


def test_onnx_observer_prob_uses_the_calibration(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from obsnet import export
    root, _ = trained
    segnet, observer, _ = load_observed(root / "obsnet", ObserverRequest(), "segnet", SPEC.nclass,
                                        0.0625, root / "segnet.pth")
    _, raw, _ = load_observed(root / "raw", ObserverRequest(), "segnet", SPEC.nclass, 0.0625,
                              root / "segnet.pth")
    assert isinstance(observer, CalibratedObserver)
    graph = export.ExportGraph(segnet, observer, SPEC.mean, SPEC.std)
    raw_graph = export.ExportGraph(segnet, raw, SPEC.mean, SPEC.std)
    path = tmp_path / "calibrated.onnx"
    path.write_bytes(export.export_bytes(graph, (32, 48), graph.metadata("Synthetic")))
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    _, prob = session.run(["logits", "observer_prob"], {"image": image.numpy()})
    a, b = observer.record["a"], observer.record["b"]
    with torch.no_grad():
        _, raw_prob = raw_graph(image)
    raw_logit = torch.logit(raw_prob.double())
    expected = torch.sigmoid(a * raw_logit + b).numpy()
    assert np.abs(prob - expected).max() < 1e-4
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["obsnet.calibration"] == f"a={a!r},b={b!r}"
    assert props["obsnet.observer"] == raw_graph.metadata()["obsnet.observer"]  # same weights
