"""``OODMeter``: pixels ranked by a score, streamed into bounded memory (OOD and error
detection: AUROC, AP, FPR95 and calibration), exact to the float32 score."""
import numpy as np
import torch
import torch.distributed as dist
from scipy.special import digamma

from obsnet.distributed import in_process_group
from obsnet.metrics.common import NAN, dist_device
from obsnet.metrics.keys import bin_edge_scores, order_key, score_bins  # noqa: F401 (re-exported)
from obsnet.metrics.risk import risk_coverage


CALIBRATION_GROUPS = 15


def _check_mask(name: str, mask, shape):
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, scores {tuple(shape)}")


def _interleaved_precision_sum(tp0, fp0, pos, neg):
    """Sum of the precisions at each positive of blocks of ``pos`` positives and ``neg``
    negatives spread evenly, after ``tp0`` / ``fp0`` pixels ranked above: the k-th positive
    sits at rank tp0 + fp0 + k·m, m = (pos + neg) / pos, so the sum over k of
    (tp0 + k) / (r0 + k·m) has the closed form (p + (tp0 - r0/m)(ψ(p + 1 + r0/m) - ψ(1 + r0/m))) / m."""
    m = (pos + neg) / pos
    c = (tp0 + fp0) / m
    return (pos + (tp0 - c) * (digamma(pos + 1 + c) - digamma(1 + c))) / m


def _ranking(pos: np.ndarray, neg: np.ndarray, spread=None):
    """AUROC, AP and FPR95 from per-threshold counts ordered from high score to low.

    Each entry is one threshold whose pixels are tied, as scikit-learn ties equal scores;
    except the entries marked ``spread`` (coarse bins known to hold distinct scores, in an
    unknown order), whose positives AP takes as spread evenly among their negatives: an
    unbiased estimate where a tie would bias AP down by up to half the bin's precision drop.
    AUROC's trapezoid is already that average. Returns NaN for every quantity that is
    undefined (no positives / no negatives).
    """
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    tp = np.cumsum(pos, dtype=np.float64)
    fp = np.cumsum(neg, dtype=np.float64)
    auroc = ap = fpr95 = NAN
    if n_pos > 0 and n_neg > 0:
        tp_prev = tp - pos
        # Trapezoid: a tied block of positives and negatives counts 1/2 per pair.
        auroc = float(np.sum(neg * (2.0 * tp_prev + pos)) / (2.0 * n_pos * n_neg))
    if n_pos > 0:
        tied = (pos > 0) & ~(np.zeros(len(pos), bool) if spread is None else spread)
        even = (pos > 0) & ~tied
        ap = float(np.sum(pos[tied] * tp[tied] / (tp[tied] + fp[tied])) / n_pos)
        if even.any():
            ap += float(np.sum(_interleaved_precision_sum(
                (tp - pos)[even], (fp - neg)[even], pos[even], neg[even])) / n_pos)
        if n_neg > 0:
            # Same float expression as sklearn's roc_curve tpr, so ties at 0.95 agree.
            first = int(np.argmax(tp / n_pos >= 0.95))
            fpr95 = float(fp[first] / n_neg)
    return auroc, ap, fpr95


def _calibration(pos: np.ndarray, count: np.ndarray, prob_sum: np.ndarray):
    """ACE and ECE on score bins ordered by score (see ``OODMeter.compute``)."""
    keep = count > 0
    pos, count, prob_sum = pos[keep], count[keep], prob_sum[keep]
    total = float(count.sum())
    if total == 0:
        return NAN, NAN
    groups = CALIBRATION_GROUPS
    # ACE: a score bin joins the equal-mass group where its first pixel falls.
    before = np.cumsum(count) - count
    ace_group = np.minimum(before * groups // int(total), groups - 1)
    ace_gaps = []
    for g in np.unique(ace_group):
        sel = ace_group == g
        n = count[sel].sum()
        ace_gaps.append(abs(prob_sum[sel].sum() - pos[sel].sum()) / n)
    # ECE: a score bin joins the uniform range of [0, 1] holding its mean prob.
    mean_prob = prob_sum / count
    ece_group = np.clip(np.floor(mean_prob * groups), 0, groups - 1).astype(np.int64)
    gap_sum = np.bincount(ece_group, weights=prob_sum, minlength=groups) \
        - np.bincount(ece_group, weights=pos, minlength=groups)
    ece = float(np.abs(gap_sum).sum() / total)
    return float(np.mean(ace_gaps)), ece


def reliability_bins(pos: np.ndarray, count: np.ndarray, prob_sum: np.ndarray,
                     groups: int = CALIBRATION_GROUPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixels, sum of probs, positives) per uniform range of [0, 1], each score bin in the
    range holding its mean prob: ECE's groups (``_calibration``), for a reliability diagram."""
    keep = count > 0
    group = np.clip(np.floor(prob_sum[keep] / count[keep] * groups), 0, groups - 1).astype(np.int64)
    return tuple(np.bincount(group, weights=w[keep], minlength=groups)
                 for w in (count, prob_sum, pos))


class OODMeter:
    """Streaming binary-ranking meter on float32 scores, with bounded memory.

    Higher score = more likely positive. Every pixel goes to a *coarse* bin, the top 20 bits of
    its order key (a relative width of 2^-11 at every magnitude). A sample of each update
    (65,536 pixels) decides which coarse bins are *refined*: from then on they keep one count
    per remaining 12 bits, i.e. one count per distinct float32 value (at most ``max_refined``
    such bins, 256 by default). A bin is refined when it holds at least 1/1024 of the sample,
    or at least 1/16 of the sampled pixels ranked at or above it (or at or below): near the
    ends of the ranking precision moves fast, and AP needs the order of even a few pixels.

    Why this is exact where it matters: scikit-learn ties two pixels exactly when their
    float32 scores are equal. Inside a refined bin the meter keys on all 32 bits, so it ties
    exactly the same pixels and orders the others as the floats: its per-threshold counts are
    sklearn's there. Scores whose spread is tiny next to their magnitude (ODIN's 0.9166 +- 1e-3,
    1e4 +- 1, probabilities within 1e-5 of 1, energies near -30 +- 0.05) pile up in a few coarse
    bins, which the first update refines. What stays coarse holds under 1/1024 of a sample per
    bin: AUROC's trapezoid over such a bin is the mean over every order of its pixels, and
    ``auroc_bound`` is the largest change any order could make. For AP, a coarse bin the samples
    saw holding one score only is a tie, as in sklearn; one seen holding distinct scores has its
    positives taken as spread evenly among its negatives (a tie there would bias AP down by
    half the bin's precision drop). Measured against sklearn: AUROC within 1e-8 and AP within
    2e-6 at 10 M and 40 M scores, Gaussian or ODIN-like (BENCHMARKS.md); tests hold every case
    (ties, +-0, +-inf, narrow spreads, saturated probabilities) to 1e-4, most to 1e-6.

    Memory: 2^20 coarse bins (about 50 MB of counts and look-up tables) plus 96 KB per refined
    bin (at most 24 MB more), whatever the pixel count.
    """

    COARSE_BITS = 20
    FINE_BITS = 32 - COARSE_BITS
    REFINE_SHARE = 1 / 1024  # share of an update's pixels that makes a coarse bin refined
    RANK_SHARE = 1 / 16  # share of the pixels ranked at or above (or below) it, likewise
    SAMPLE = 1 << 16  # pixels per update looked at to find the bins to refine
    # Pixels binned per pass: temporaries stay ~16 MB, re-used by the allocator, so that
    # memory does not grow with the batch and no large buffer is page-faulted in each time.
    CHUNK = 1 << 22

    def __init__(self, max_refined: int = 256, device=None):
        if not 0 <= max_refined < 1 << 15:
            raise ValueError(f"max_refined must be in [0, 32767], got {max_refined}")
        self.max_refined = max_refined
        self.ncoarse, self.nfine = 1 << self.COARSE_BITS, 1 << self.FINE_BITS
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self):
        """Forget every pixel seen (state is re-created on the next update)."""
        self._counts = None  # int64 2×L: negatives, positives; coarse bins then refined slots
        self._prob = None  # float64 L: sums of the calibration probabilities
        self._slot_of = None  # int32 per coarse bin: its refined slot, or -1
        self._spread = None  # bool per coarse bin: seen holding two distinct scores
        self._seen = None  # int64 per coarse bin: the one order key sampled there, else -1
        self._hits = None  # int64 per coarse bin: sampled pixels that fell there
        self.bins: list[int] = []  # the refined coarse bins, in slot order
        self._updates = 0
        self._prob_updates = 0

    def _init_state(self, device):
        self.device = torch.device(device)
        self._counts = torch.zeros(2, self.ncoarse, dtype=torch.int64, device=self.device)
        self._prob = torch.zeros(self.ncoarse, dtype=torch.float64, device=self.device)
        # int16 (max_refined < 2^15): a small table keeps the per-pixel look-up in cache.
        self._slot_of = torch.full((self.ncoarse,), -1, dtype=torch.int16, device=self.device)
        self._base = torch.arange(self.ncoarse, dtype=torch.int32, device=self.device)
        self._low = torch.zeros(self.ncoarse, dtype=torch.int32, device=self.device)
        self._spread = torch.zeros(self.ncoarse, dtype=torch.bool, device=self.device)
        self._seen = torch.full((self.ncoarse,), -1, dtype=torch.int64, device=self.device)
        self._hits = torch.zeros(self.ncoarse, dtype=torch.int64, device=self.device)
        self.bins = []

    @property
    def has_probs(self) -> bool:
        """True when at least one update was made and every update gave ``probs``."""
        return self._updates > 0 and self._prob_updates == self._updates

    def state_tensors(self):
        """The tensors holding the counts (empty before the first update)."""
        return [] if self._counts is None else [self._counts, self._prob]

    def _refine(self, new_bins) -> None:
        """Give each coarse bin of ``new_bins`` a slot of fine counts (zeros to start)."""
        new_bins = [int(b) for b in new_bins if self._slot_of[int(b)] < 0]
        new_bins = new_bins[: self.max_refined - len(self.bins)]
        if not new_bins:
            return
        first = len(self.bins)
        self._slot_of[torch.tensor(new_bins, device=self.device)] = torch.arange(
            first, first + len(new_bins), dtype=torch.int16, device=self.device)
        self.bins += new_bins
        refined = torch.tensor(new_bins, device=self.device)
        slots = torch.arange(first, first + len(new_bins), dtype=torch.int32, device=self.device)
        self._base[refined] = self.ncoarse + slots * self.nfine
        self._low[refined] = self.nfine - 1
        extra = len(new_bins) * self.nfine
        self._counts = torch.cat([self._counts, self._counts.new_zeros(2, extra)], 1)
        self._prob = torch.cat([self._prob, self._prob.new_zeros(extra)])

    def _sample(self, scores, valid) -> None:
        """Look at a sample of the update: mark what it shows of each coarse bin, then refine
        the coarse bins that, in the sample, hold at least REFINE_SHARE
        of the pixels, or at least RANK_SHARE of the pixels ranked at or above them (or at or
        below): near the top and the bottom of the ranking, precision moves fast, so AP
        needs the order of even a few pixels there."""
        step = scores.numel() // self.SAMPLE + 1
        sample = scores[::step]
        if valid is not None:
            sample = sample[valid[::step]]
        if sample.numel() == 0:
            return
        self._mark_spread(sample)
        if len(self.bins) >= self.max_refined:
            return
        bins, counts = torch.unique(score_bins(sample, self.COARSE_BITS), return_counts=True)
        counts = counts.double()
        from_top = counts.flip(0).cumsum(0).flip(0)  # pixels in this bin or above it
        from_bottom = counts.cumsum(0)
        need = torch.maximum(counts / (self.REFINE_SHARE * sample.numel()),
                             counts / (self.RANK_SHARE * torch.minimum(from_top, from_bottom)))
        need.masked_fill_(self._slot_of[bins] >= 0, 0)
        heavy = torch.nonzero(need >= 1).flatten()
        order = torch.argsort(need[heavy], descending=True, stable=True)
        self._refine(bins[heavy[order]][: self.max_refined - len(self.bins)].tolist())

    def _mark_spread(self, sample) -> None:
        """What ``sample`` tells of each coarse bin: it holds distinct float32 scores
        (``_spread``), or one score so far (``_seen``), from how many pixels (``_hits``)."""
        keys, hits = torch.unique(order_key(sample).long() & 0xFFFFFFFF, return_counts=True)
        bins = keys >> self.FINE_BITS
        self._hits.index_add_(0, bins, hits)
        starts = torch.ones_like(bins, dtype=torch.bool)
        starts[1:] = bins[1:] != bins[:-1]
        first = bins[starts]  # one entry per bin: its smallest sampled key
        several = torch.bincount(torch.cumsum(starts, 0) - 1) > 1
        before = self._seen[first]
        self._spread[first[several | ((before >= 0) & (before != keys[starts]))]] = True
        self._seen[first] = keys[starts]

    def _tied(self) -> torch.Tensor:
        """Coarse bins to rank as one tie: sampled twice or more, always on one score."""
        return ~self._spread & (self._hits >= 2)

    def update(self, scores, is_positive, valid=None, probs=None):
        """Add pixels. All arguments share one shape (e.g. B×H×W).

        ``is_positive``/``valid`` are bool; only pixels with ``valid`` True count.
        ``probs`` (in [0, 1]) is the method's probability that the pixel is
        positive, used only for ACE/ECE. Raises ``ValueError`` on NaN scores or
        on probs outside [0, 1] among counted pixels.
        """
        _check_mask("is_positive", is_positive, scores.shape)
        _check_mask("valid", valid, scores.shape)
        if probs is not None and probs.shape != scores.shape:
            raise ValueError(f"probs has shape {tuple(probs.shape)}, scores {tuple(scores.shape)}")
        if self._counts is None:
            self._init_state(scores.device if self.device is None else self.device)
        dev = self.device
        scores, is_positive = scores.to(dev).flatten(), is_positive.to(dev).flatten()
        valid = None if valid is None else valid.to(dev).flatten()
        probs = None if probs is None else probs.to(dev).flatten()
        self._check_values(scores, valid, probs)
        self._sample(scores, valid)
        for start in range(0, scores.numel(), self.CHUNK):
            part = slice(start, start + self.CHUNK)
            self._count(scores[part], is_positive[part], None if valid is None else valid[part],
                        None if probs is None else probs[part])
        self._updates += 1
        self._prob_updates += probs is not None

    def _entries(self, scores):
        """Each score's entry in the state: its coarse bin, or ncoarse + slot·nfine + low bits."""
        key = order_key(scores)
        coarse = key >> self.FINE_BITS
        coarse &= self.ncoarse - 1
        if not self.bins:
            return coarse
        # Two look-ups per pixel: where its bin's entries start, and which low bits to keep
        # (none for a coarse bin, all FINE_BITS for a refined one).
        key &= torch.index_select(self._low, 0, coarse)
        key += torch.index_select(self._base, 0, coarse)
        return key

    def _count(self, scores, is_positive, valid, probs):
        """Count one chunk of flat tensors (and sum its probs)."""
        length = self._counts.shape[1]
        entry = self._entries(scores)
        key = entry.add(is_positive.to(torch.int32), alpha=length)
        if valid is not None:
            key.masked_fill_(~valid, 2 * length)  # one spare bin, dropped below
        self._counts += torch.bincount(key, minlength=2 * length + 1)[:-1].view(2, length)
        if probs is not None:
            if valid is not None:
                entry.masked_fill_(~valid, length)
            weights = probs.to(torch.float64)
            self._prob += torch.bincount(entry, weights, minlength=length + 1)[:-1]

    @staticmethod
    def _check_values(scores, valid, probs):
        # One host sync for all checks.
        bad = [torch.isnan(scores)]
        if probs is not None:
            bad.append((probs < 0) | (probs > 1) | torch.isnan(probs))
        if valid is not None:
            bad = [b.logical_and_(valid) for b in bad]
        nan_scores, *bad_probs = torch.stack([b.any() for b in bad]).tolist()
        if nan_scores:
            raise ValueError("OODMeter.update: scores contain NaN")
        if any(bad_probs):
            raise ValueError("OODMeter.update: probs must lie in [0, 1] (no NaN)")

    def _fine(self, slot: int) -> slice:
        start = self.ncoarse + slot * self.nfine
        return slice(start, start + self.nfine)

    def merge(self, other: "OODMeter"):
        """Add the pixels counted by ``other`` to this meter.

        A bin refined in ``other`` is refined here too while slots are free; past
        ``max_refined``, its fine counts join the coarse bin (``auroc_bound`` then says so).
        """
        if other._counts is None:
            return self
        if self._counts is None:
            self._init_state(other.device if self.device is None else self.device)
        self._refine(other.bins)
        theirs = other._seen.to(self.device)
        clash = (theirs >= 0) & (self._seen >= 0) & (theirs != self._seen)
        self._spread |= other._spread.to(self.device) | clash
        self._seen = torch.where(theirs >= 0, theirs, self._seen)
        self._hits += other._hits.to(self.device)
        counts, prob = other._counts.to(self.device), other._prob.to(self.device)
        self._counts[:, : self.ncoarse] += counts[:, : self.ncoarse]
        self._prob[: self.ncoarse] += prob[: self.ncoarse]
        for slot, b in enumerate(other.bins):
            part = other._fine(slot)
            mine = int(self._slot_of[b])
            if mine >= 0:
                self._counts[:, self._fine(mine)] += counts[:, part]
                self._prob[self._fine(mine)] += prob[part]
            else:
                self._counts[:, b] += counts[:, part].sum(1)
                self._prob[b] += prob[part].sum()
        self._updates += other._updates
        self._prob_updates += other._prob_updates
        return self

    def all_reduce(self):
        """Sum the state over the default process group; a no-op without one.

        The ranks first agree on the refined bins (those refined on most ranks, at most
        ``max_refined``), re-lay their counts on them, then sum.
        """
        if not in_process_group():
            return self
        device = dist_device() if self.device is None else self.device
        if self._counts is None:
            self._init_state(device)
        votes = torch.zeros(self.ncoarse, dtype=torch.int32, device=self.device)
        if self.bins:
            votes[torch.tensor(self.bins, device=self.device)] = 1
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)
        order = torch.argsort(-votes, stable=True)[: self.max_refined]
        agreed = sorted(b for b in order[votes[order] > 0].tolist())
        common = OODMeter(self.max_refined, self.device)
        common._init_state(self.device)
        common._refine(agreed)
        common.merge(self)
        ups = torch.tensor([common._updates, common._prob_updates], device=self.device)
        spread = common._spread.to(torch.int32)
        for t in (common._counts, common._prob, ups, spread, common._hits):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        low = torch.where(common._seen >= 0, common._seen, torch.iinfo(torch.int64).max)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(common._seen, op=dist.ReduceOp.MAX)
        clash = (common._seen >= 0) & (low != common._seen)  # ranks sampled distinct scores
        self._counts, self._prob, self._slot_of, self._base, self._low, self.bins = (
            common._counts, common._prob, common._slot_of, common._base, common._low, common.bins)
        self._spread, self._seen, self._hits = (spread > 0) | clash, common._seen, common._hits
        self._updates, self._prob_updates = (int(v) for v in ups.tolist())
        return self

    def table(self):
        """(neg, pos, prob_sum, auroc_bound): float64 arrays with one entry per occupied
        threshold, from the lowest score to the highest; see the class docstring."""
        return self._table()[:4]

    def _table(self):
        """``table()`` and, per entry, whether it is a coarse bin known to hold distinct
        scores (``spread``: AP takes them as interleaved, not tied; see ``_ranking``)."""
        if self._counts is None:
            empty = np.zeros(0)
            return empty, empty, empty, 0.0, np.zeros(0, dtype=bool)
        counts = self._counts.cpu().numpy().astype(np.float64)
        prob = self._prob.cpu().numpy()
        spread = (~self._tied()).cpu().numpy().astype(np.float64)
        coarse = np.vstack([counts[:, : self.ncoarse], prob[None, : self.ncoarse], spread[None]])
        pieces, start, loose_pairs = [], 0, 0.0
        for slot, b in sorted(enumerate(self.bins), key=lambda sb: sb[1]):
            fine = np.vstack([counts[:, self._fine(slot)], prob[None, self._fine(slot)],
                              np.zeros((1, self.nfine))])
            loose_pairs += _place_residual(fine[:3], coarse[:3, b].copy())
            pieces += [coarse[:, start:b], fine]
            start = b + 1
        pieces.append(coarse[:, start:])
        neg, pos, prob_sum, spread = np.hstack(pieces)
        rest = np.ones(self.ncoarse, dtype=bool)
        rest[self.bins] = False
        loose_pairs += 0.5 * float(np.sum(coarse[0, rest] * coarse[1, rest]))
        keep = (neg + pos) > 0
        n_pairs = float(neg.sum()) * float(pos.sum())
        bound = loose_pairs / n_pairs if n_pairs else 0.0
        return neg[keep], pos[keep], prob_sum[keep], bound, spread[keep] > 0

    def coarse_table(self):
        """(upper, neg, pos): per occupied *coarse* bin, from the lowest score to the highest,
        the largest float32 score the bin can hold and its counts (a refined bin's fine counts
        summed back). "score <= upper[i]" accepts exactly the bins up to i, whatever was
        refined, in this meter or another: thresholds fitted on these edges count exactly."""
        if self._counts is None:
            empty = np.zeros(0)
            return empty.astype(np.float32), empty, empty
        counts = self._counts.cpu().numpy().astype(np.float64)
        neg, pos = counts[0, : self.ncoarse].copy(), counts[1, : self.ncoarse].copy()
        for slot, b in enumerate(self.bins):
            neg[b] += counts[0, self._fine(slot)].sum()
            pos[b] += counts[1, self._fine(slot)].sum()
        occupied = np.flatnonzero(neg + pos)
        upper = occupied.astype(np.uint64) * self.nfine + (self.nfine - 1)
        return bin_edge_scores(upper), neg[occupied], pos[occupied]

    def risk_coverage(self) -> dict:
        """Risk–coverage of the scores as a reject option, the positives being the risk
        (``obsnet.metrics.risk.risk_coverage``: AURC, E-AURC, coverage at selective risk
        1/2/5%, and the curve)."""
        neg, pos, _, _ = self.table()
        return risk_coverage(pos, neg)
    def reliability(self):
        """``reliability_bins`` of the pixels counted (None unless every update gave
        ``probs``): from the bins, whatever the pixel count."""
        if not self.has_probs:
            return None
        neg, pos, prob_sum, _ = self.table()
        return reliability_bins(pos, pos + neg, prob_sum)

    def pr_curve_counts(self):
        """(tp, fp, tn, fn) int64 tensors, one entry per occupied threshold, high score first.

        Entry i counts the pixels predicted positive at threshold "score >= threshold i".
        Ready for TensorBoard's ``add_pr_curve_raw``.
        """
        neg, pos, _, _ = self.table()
        tp = torch.from_numpy(np.cumsum(pos[::-1])).long()
        fp = torch.from_numpy(np.cumsum(neg[::-1])).long()
        return tp, fp, int(neg.sum()) - fp, int(pos.sum()) - tp

    def compute(self) -> dict:
        """Metrics as Python floats (``n_pos``/``n_neg`` as ints).

        - ``auroc``: ROC AUC; tied pixels are one threshold (trapezoid, so a tied
          positive/negative pair counts 1/2), as sklearn's roc_auc_score.
        - ``ap``: average precision, sum over thresholds from high to low of
          (R_n - R_{n-1}) * P_n, as sklearn's average_precision_score.
        - ``ap_neg``: the same with negatives as the class of interest and
          scores negated.
        - ``fpr95``: walking thresholds from the highest score down (positive
          when score >= t), the false-positive rate at the first t with TPR >= 0.95.
        - ``fpr95_neg``: roles swapped: walking up from the lowest score,
          accepting pixels with score <= t, the share of positives accepted at
          the first t that accepts >= 95% of negatives (ObsNet's protocol with
          positives = segmentation errors).
        - ``ace``/``ece`` (None unless every update gave ``probs``), both on
          groups of consecutive thresholds, |mean prob - positive rate| per
          group: ``ace`` averages it over the non-empty groups among 15 groups
          of about equal pixel count (a threshold joins the group in which its first
          pixel falls); ``ece`` weights it by pixel count over 15 uniform ranges
          of [0, 1], each threshold going to the range holding its mean prob.
        - ``auroc_bound``: the largest |AUROC - exact AUROC| the unrefined bins allow.
        - ``tie_share``: the share of pixels that share the most common score (exact when
          its bin was refined, as every bin holding 1/1024 of a batch is; else an upper bound).

        Undefined values (no positives and/or no negatives) are NaN, never a
        fake 0 or 1; a threshold that is never reached is reported as NaN.
        """
        neg, pos, prob_sum, bound, spread = self._table()
        auroc, ap, fpr95 = _ranking(pos[::-1], neg[::-1], spread[::-1])
        _, ap_neg, fpr95_neg = _ranking(neg, pos, spread)
        ace = ece = None
        if self.has_probs:
            ace, ece = _calibration(pos, pos + neg, prob_sum)
        total = pos + neg
        return {"auroc": auroc, "ap": ap, "ap_neg": ap_neg, "fpr95": fpr95,
                "fpr95_neg": fpr95_neg, "ace": ace, "ece": ece, "auroc_bound": bound,
                "tie_share": float(total.max() / total.sum()) if total.size else NAN,
                "n_pos": int(pos.sum()), "n_neg": int(neg.sum())}


def _place_residual(fine: np.ndarray, residual: np.ndarray) -> float:
    """Add a refined bin's coarse ``residual`` (pixels counted before it was refined, or merged
    from a meter that had not refined it) to its fine entry at the bin's median pixel, in place.

    Returns the (positive, negative) pairs whose order this may get wrong, each worth up to 1.
    """
    if residual[:2].sum() == 0:
        return 0.0
    total = fine[0] + fine[1]
    at = int(np.searchsorted(np.cumsum(total), total.sum() / 2)) if total.sum() else fine.shape[1] // 2
    fine[:, at] += residual
    neg_all, pos_all = fine[0].sum(), fine[1].sum()
    return float(residual[1] * neg_all + residual[0] * pos_all - residual[0] * residual[1])
