"""Risk–coverage (obsnet/metrics/risk.py, OODMeter.risk_coverage) against a brute-force numpy
reference that walks the pixels one by one, on hard inputs: ties, constant scores, no errors,
all errors, tiny spreads around a large value, float16 scores, a meter fed in many updates."""
import numpy as np
import pytest
import torch

from obsnet.metrics.ood import OODMeter
from obsnet.metrics.risk import RISK_TARGETS, oracle_aurc, risk_coverage


def brute_force(scores: np.ndarray, errors: np.ndarray) -> dict:
    """AURC as the mean, over k = 1..N, of the expected error rate of the k most confident
    pixels (ties in random order: each position of a tied block holds an error with the
    block's error rate); the oracle's AURC by sorting the errors last; the coverage at risk R
    over the thresholds "score <= t" for every score present."""
    scores = scores.astype(np.float32).astype(np.float64)
    errors = errors.astype(np.float64)
    n = len(scores)
    expected_errors_at = np.empty(n)  # expected error indicator at each rank
    order = np.argsort(scores, kind="stable")
    s_sorted, e_sorted = scores[order], errors[order]
    i = 0
    while i < n:
        j = i
        while j < n and s_sorted[j] == s_sorted[i]:
            j += 1
        expected_errors_at[i:j] = e_sorted[i:j].mean()
        i = j
    risks = [expected_errors_at[:k + 1].sum() / (k + 1) for k in range(n)]
    aurc = float(np.mean(risks))
    oracle = np.sort(errors)  # correct pixels (0) first
    oracle_aurc_bf = float(np.mean([oracle[:k + 1].sum() / (k + 1) for k in range(n)]))
    coverage = {}
    for target in RISK_TARGETS:
        best = 0.0
        for t in np.unique(scores):
            accepted = scores <= t
            if errors[accepted].mean() <= target:
                best = max(best, accepted.mean())
        coverage[target] = best
    return {"aurc": aurc, "eaurc": aurc - oracle_aurc_bf, "coverage": coverage}


def meter_of(scores, errors, chunks: int = 1) -> OODMeter:
    meter = OODMeter()
    for s, e in zip(np.array_split(scores, chunks), np.array_split(errors, chunks)):
        meter.update(torch.as_tensor(s), torch.as_tensor(e.astype(bool)))
    return meter


def check(scores, errors, chunks=1, tol=1e-9):
    got = meter_of(scores, errors, chunks).risk_coverage()
    want = brute_force(np.asarray(scores, np.float32), np.asarray(errors))
    assert got["aurc"] == pytest.approx(want["aurc"], abs=tol)
    assert got["eaurc"] == pytest.approx(want["eaurc"], abs=tol)
    for target in RISK_TARGETS:
        assert got[f"cov_at_risk_{round(100 * target)}"] == pytest.approx(
            want["coverage"][target], abs=1e-12)
    return got


CASES = {
    "distinct": lambda r: (r.random(400), r.random(400) < 0.2),
    "ties": lambda r: (r.integers(0, 6, 500).astype(np.float32) / 5, r.random(500) < 0.3),
    "constant": lambda r: (np.full(300, 0.7, np.float32), r.random(300) < 0.25),
    "no_errors": lambda r: (r.random(200), np.zeros(200, bool)),
    "all_errors": lambda r: (r.random(200), np.ones(200, bool)),
    "tiny_spread_large": lambda r: (np.float32(1e4) + r.integers(-3, 4, 600).astype(np.float32)
                                    * np.float32(1e-3), r.random(600) < 0.1),
    "saturated_probs": lambda r: (1 - r.integers(0, 4, 500).astype(np.float32) * 1e-7,
                                  r.random(500) < 0.5),
    "informative": lambda r: (lambda e: (e * 0.5 + r.random(800), e))(r.random(800) < 0.1),
    "rare_errors_low_risk": lambda r: (lambda e: (e * 2.0 + r.random(1000), e))(
        r.random(1000) < 0.03),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_meter_matches_the_pixel_by_pixel_reference(case):
    scores, errors = CASES[case](np.random.default_rng(7))
    check(np.asarray(scores, np.float32), np.asarray(errors))


def test_float16_scores_and_many_updates():
    rng = np.random.default_rng(1)
    errors = rng.random(3000) < 0.15
    scores = (errors * 0.3 + rng.random(3000)).astype(np.float16)  # float16 ties many values
    got = check(scores.astype(np.float32), errors, chunks=7)
    meter = OODMeter()
    for s, e in zip(np.array_split(scores, 5), np.array_split(errors, 5)):
        meter.update(torch.from_numpy(s), torch.from_numpy(e))  # float16 tensors in
    assert meter.risk_coverage()["aurc"] == pytest.approx(got["aurc"], abs=1e-12)


def test_edge_values_and_known_answers():
    # no errors: zero risk everywhere, everything accepted; all errors: risk 1, nothing accepted
    none = risk_coverage(np.zeros(3), np.array([2.0, 1.0, 4.0]))
    assert none["aurc"] == 0 and none["eaurc"] == 0 and none["cov_at_risk_1"] == 1
    every = risk_coverage(np.array([2.0, 1.0]), np.zeros(2))
    assert every["aurc"] == pytest.approx(1) and every["eaurc"] == pytest.approx(0)
    assert every["cov_at_risk_5"] == 0
    # a perfect ranking has E-AURC 0; the reversed one the largest
    perfect = risk_coverage(np.array([0.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0]))
    assert perfect["eaurc"] == pytest.approx(0, abs=1e-12)
    # hand-computed: one error among 4 pixels, ranked second: risks 0, 1/2, 1/3, 1/4
    hand = risk_coverage(np.array([0.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 1.0, 1.0]))
    assert hand["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert oracle_aurc(1, 4) == pytest.approx((1 / 4) / 4)
    assert hand["cov_at_risk_5"] == 0.25  # only the first pixel keeps the risk under 5%
    empty = risk_coverage(np.zeros(0), np.zeros(0))
    assert np.isnan(empty["aurc"]) and np.isnan(empty["cov_at_risk_2"])


def test_results_table_and_files_carry_risk_coverage():
    from obsnet.report import columns_of, format_table
    entry = {"ms_per_image": 1.0, "error": {"auroc": 0.9, "aurc": 0.0123, "eaurc": 0.004,
                                            "cov_at_risk_1": 0.5, "cov_at_risk_2": 0.6,
                                            "cov_at_risk_5": 0.8}}
    results = {"split": "val", "n_images": 1, "methods": {"obsnet": entry},
               "segnet": {"miou": float("nan"), "pixel_acc": 0.9, "iou": {}}}
    keys = {key for block, key, _ in columns_of(results) if block == "error"}
    assert {"aurc", "eaurc", "cov_at_risk_1", "cov_at_risk_2", "cov_at_risk_5"} <= keys
    table = format_table(results)
    assert "AURC" in table and "E-AURC" in table and "Cov@5%" in table and "1.2" in table
