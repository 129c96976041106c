"""Risk–coverage of a score used to reject pixels (error protocol: the positives are the
segmenter's errors, a higher score means "more likely wrong"): accept the pixels with the
lowest scores first.

- Selective risk at coverage c: the error rate among the accepted pixels when a share c of
  the pixels is accepted.
- ``aurc``: the area under the risk–coverage curve, the mean over k = 1..N of the selective
  risk of the k most confident pixels (Geifman et al., 2019). Pixels tied at one score have
  no order: AURC takes its expectation over their orders (each tied block contributes
  ``sum_j (e0 + j p) / (n0 + j)``, closed form below), which is also the unbiased value for a
  bin of distinct scores whose order the meter did not keep.
- ``eaurc``: AURC minus the AURC of the oracle ranking with the same error rate (every
  error rejected before any correct pixel).
- ``cov_at_risk_R``: the largest coverage whose selective risk is at most R% among the
  thresholds one can deploy, "accept score <= t" for the scores present (a tie is accepted or
  rejected as a whole); 0 when even the most confident threshold has a higher risk.

Everything is computed from per-threshold counts (``OODMeter.table``), in bounded memory.
"""
import numpy as np
import torch
from scipy.special import digamma

from obsnet.metrics.common import NAN
from obsnet.metrics.keys import bin_edge_scores, score_bins

RISK_TARGETS = (0.01, 0.02, 0.05)  # the selective risks whose coverage is reported


def _tied_risk_sum(e0, n0, errors, count):
    """Sum over j = 1..count of the expected selective risk after ``n0`` pixels (``e0`` of
    them errors) and j pixels drawn in random order from a block of ``count`` pixels holding
    ``errors`` errors: sum_j (e0 + j p) / (n0 + j), p = errors / count, which is
    count * p + (e0 - p n0) (H(n0 + count) - H(n0)), H the harmonic numbers (digamma)."""
    p = errors / count
    harmonic = digamma(n0 + count + 1.0) - digamma(n0 + 1.0)
    return count * p + (e0 - p * n0) * harmonic


def oracle_aurc(n_errors: float, n_total: float) -> float:
    """AURC of the ranking that rejects every error first: (1/N) sum over the last E
    positions k of (k - (N - E)) / k."""
    if n_total <= 0:
        return NAN
    correct = n_total - n_errors
    if n_errors == 0:
        return 0.0
    return float((n_errors - correct * (digamma(n_total + 1.0) - digamma(correct + 1.0)))
                 / n_total)


def risk_coverage(errors: np.ndarray, correct: np.ndarray) -> dict:
    """AURC, E-AURC and the coverage at each selective risk of ``RISK_TARGETS`` from the
    per-threshold counts of errors and correct pixels, ordered from the lowest score to the
    highest; plus the curve at each threshold (``coverage``, ``risk`` arrays). NaN (and empty
    arrays) when there is no pixel."""
    errors, correct = np.asarray(errors, np.float64), np.asarray(correct, np.float64)
    count = errors + correct
    keep = count > 0
    errors, count = errors[keep], count[keep]
    total = float(count.sum())
    if total == 0:
        return {"aurc": NAN, "eaurc": NAN, **{_key(r): NAN for r in RISK_TARGETS},
                "coverage": np.zeros(0), "risk": np.zeros(0)}
    e_cum, n_cum = np.cumsum(errors), np.cumsum(count)
    aurc = float(np.sum(_tied_risk_sum(e_cum - errors, n_cum - count, errors, count)) / total)
    coverage, risk = n_cum / total, e_cum / n_cum
    out = {"aurc": aurc, "eaurc": aurc - oracle_aurc(float(errors.sum()), total)}
    for target in RISK_TARGETS:
        ok = risk <= target
        out[_key(target)] = float(coverage[ok].max()) if ok.any() else 0.0
    return out | {"coverage": coverage, "risk": risk}


def _key(target: float) -> str:
    """``cov_at_risk_5`` for a selective risk of 5%."""
    return f"cov_at_risk_{round(100 * target):d}"


COVERAGE_KEYS = tuple(_key(r) for r in RISK_TARGETS)


def curve_points(coverage: np.ndarray, risk: np.ndarray, points: int = 512):
    """At most ``points`` (coverage, risk) pairs of a curve, evenly spread in coverage, the
    last threshold always kept (for plots)."""
    if len(coverage) <= points:
        return coverage, risk
    at = np.unique(np.searchsorted(coverage, np.linspace(0, 1, points), side="left").clip(
        0, len(coverage) - 1))
    return coverage[at], risk[at]


# ------------------------------------------------------------- operating points (thresholds)
# A threshold t means: accept (no alarm) the pixels whose score is <= t. The pooled ones are
# fitted on coarse-bin edges (``OODMeter.coarse_table``), so that any other meter counts the
# pixels on either side of them exactly.

def _accepted(upper: np.ndarray, threshold: float) -> int:
    """How many entries of a table (upper edges ascending) "score <= threshold" accepts."""
    return int(np.searchsorted(upper, np.float32(threshold), side="right"))


def fit_tpr_threshold(table, target: float) -> float:
    """The smallest edge that accepts at least ``target`` of the correct pixels (the error
    protocol's negatives) of ``table`` = (upper, correct, errors); NaN without correct pixels."""
    upper, correct, _ = table
    total = float(np.sum(correct))
    if total == 0:
        return NAN
    reached = np.cumsum(correct) >= target * total * (1 - 1e-12)
    return float(upper[int(np.argmax(reached))])


def fit_risk_threshold(table, target: float) -> float:
    """The largest edge whose selective risk (errors among the accepted pixels) is at most
    ``target``; -inf (accept nothing) when even the most confident bin is riskier."""
    upper, correct, errors = table
    accepted = np.cumsum(correct + errors)
    risk = np.cumsum(errors) / np.maximum(accepted, 1)
    ok = (risk <= target) & (accepted > 0)
    return float(upper[np.flatnonzero(ok)[-1]]) if ok.any() else float("-inf")


def rates_at(threshold: float, error_table, ood_table=None) -> dict:
    """What "alarm when score > ``threshold``" gives on the pixels of the tables
    (``OODMeter.coarse_table()`` of the error and the OOD meter): ``accepted_correct`` (share
    of the correct pixels without alarm), ``caught_errors`` (share of the errors with one),
    ``selective_risk`` and ``coverage`` (errors among / share of the accepted pixels),
    ``false_alarms_per_mpx`` (alarms on correct pixels per million pixels scored) and, with
    an OOD table holding anomalies, ``caught_anomalies``. NaN where undefined."""
    upper, correct, errors = error_table
    k = _accepted(upper, threshold)
    n_correct, n_errors = float(np.sum(correct)), float(np.sum(errors))
    acc_c, acc_e = float(np.sum(correct[:k])), float(np.sum(errors[:k]))
    total = n_correct + n_errors
    out = {"accepted_correct": acc_c / n_correct if n_correct else NAN,
           "caught_errors": 1 - acc_e / n_errors if n_errors else NAN,
           "selective_risk": acc_e / (acc_c + acc_e) if acc_c + acc_e else NAN,
           "coverage": (acc_c + acc_e) / total if total else NAN,
           "false_alarms_per_mpx": 1e6 * (n_correct - acc_c) / total if total else NAN}
    if ood_table is not None and float(np.sum(ood_table[2])) > 0:
        o_upper, _, anomalies = ood_table
        out["caught_anomalies"] = 1 - float(np.sum(anomalies[:_accepted(o_upper, threshold)])) \
            / float(np.sum(anomalies))
    return out


class ImageCounts:
    """Per image, how many correct and wrong pixels fall in each bin of the scores' order keys
    (the top ``BITS`` bits: a relative width of 2^-(BITS - 9)), for the conformal threshold
    (``conformal_tpr_threshold``), whose guarantee is per image. Memory grows with the images
    (at most 2^BITS entries each; a few thousand in practice)."""

    BITS = 16

    def __init__(self):
        self.images: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, scores: torch.Tensor, errors: torch.Tensor, valid: torch.Tensor) -> None:
        """Add the B images of B×H×W ``scores`` (``errors``, ``valid``: bool, same shape)."""
        keys = score_bins(scores.float(), self.BITS).long()
        wrong = errors.long()
        for k, w, v in zip(keys, wrong, valid):
            k, w = k[v], w[v]
            counts = torch.bincount(k * 2 + w, minlength=2 << self.BITS).view(-1, 2)
            bins = torch.nonzero(counts.sum(1)).flatten()
            pair = counts[bins].cpu().numpy()
            self.images.append((bins.cpu().numpy().astype(np.uint32), pair[:, 0], pair[:, 1]))

    def edges(self) -> np.ndarray:
        """The upper score edge of every bin occupied in some image, ascending."""
        bins = np.unique(np.concatenate([b for b, _, _ in self.images])) if self.images \
            else np.zeros(0, np.uint32)
        width = 1 << (32 - self.BITS)
        return bin_edge_scores(bins.astype(np.uint64) * width + (width - 1))

    def rejected_correct(self, candidates: np.ndarray) -> np.ndarray:
        """images × candidates: each image's share of correct pixels with score above each
        candidate threshold (0 for an image without correct pixels)."""
        width = 1 << (32 - self.BITS)
        out = np.zeros((len(self.images), len(candidates)))
        for i, (bins, correct, _) in enumerate(self.images):
            total = correct.sum()
            if total == 0:
                continue
            upper = bin_edge_scores(bins.astype(np.uint64) * width + (width - 1))
            accepted = np.r_[0, np.cumsum(correct)][np.searchsorted(upper, candidates, "right")]
            out[i] = 1 - accepted / total
        return out


def conformal_tpr_threshold(counts: ImageCounts, target: float) -> tuple[float, float]:
    """(threshold, bound) by conformal risk control (Angelopoulos et al., 2022, theorem 1)
    on the per-image loss L_i(t) = the share of image i's correct pixels with score > t, which
    falls as t grows and lies in [0, 1]: the smallest candidate t with
    (n / (n + 1)) mean_i L_i(t) + 1 / (n + 1) <= alpha, alpha = 1 - ``target``. If the n fit
    images and a new image are exchangeable, E[L_new(t)] <= alpha: in expectation over the
    images (not per pixel, not for every image), a new image keeps at least ``target`` of its
    correct pixels without alarm. NaN when n is too small for alpha (1 / (n + 1) > alpha)."""
    n = len(counts.images)
    alpha = 1 - target + 1e-12  # 1 - 0.8 is 0.19999999999999996 in floats: not below 1/5
    candidates = counts.edges()
    if n == 0 or 1 / (n + 1) > alpha or not len(candidates):
        return NAN, NAN
    bound = n / (n + 1) * counts.rejected_correct(candidates).mean(axis=0) + 1 / (n + 1)
    ok = np.flatnonzero(bound <= alpha)
    return (float(candidates[ok[0]]), float(bound[ok[0]])) if ok.size else (NAN, NAN)


def image_accepted_correct(counts: ImageCounts, threshold: float) -> float:
    """The mean over the images (with correct pixels or not) of each image's share of correct
    pixels accepted at ``threshold``: what the conformal guarantee is about."""
    if not counts.images:
        return NAN
    return float(1 - counts.rejected_correct(np.array([threshold], np.float32))[:, 0].mean())
