"""OODMeter against scikit-learn on score distributions that defeat fixed-width binning.

Each case is fed in several updates. Where the meter reports itself exact
(``auroc_bound == 0``) AUROC and both APs must agree with sklearn to 1e-9.
"""
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from sklearn.metrics import average_precision_score, roc_auc_score

from obsnet.metrics.ood import OODMeter, score_bins
from tests.helpers.reference import _assert_matches, _feed, _reference
from tests.helpers.runner import spawn

TOL = 1e-4  # AUROC, AP, AP_neg
TOL_FPR = 1e-3  # FPR95, FPR95_neg
EXACT = 1e-9  # AUROC, AP, AP_neg where auroc_bound == 0


def _odin(t):
    """ODIN-like scores: a 1e-3 spread around 0.9166."""
    return 0.9166 + 1e-3 * np.tanh(t)


def _broad(t):
    """Broad Gaussian logits."""
    return 3.0 * t


def _data(n, f, seed, rate=0.3, sep=1.0, dtype=np.float32):
    """Bool labels y and scores f(z + sep*y), z standard normal, cast to ``dtype``."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rate
    return y, f(rng.standard_normal(n) + sep * y).astype(dtype)


def _check(res, y, s):
    """Assert ``res`` matches sklearn on (y, s) within TOL / TOL_FPR, and within EXACT on
    AUROC and the APs when the meter says it is exact. Returns sklearn's values."""
    ref = _reference(y, s)
    exact = res["auroc_bound"] == 0
    for key in ("auroc", "ap", "ap_neg"):
        assert res[key] == pytest.approx(ref[key], abs=EXACT if exact else TOL), key
    for key in ("fpr95", "fpr95_neg"):
        assert res[key] == pytest.approx(ref[key], abs=TOL_FPR), key
    assert res["n_pos"] == int(y.sum()) and res["n_neg"] == int((~y).sum())
    assert abs(res["auroc"] - ref["auroc"]) <= res["auroc_bound"] + 1e-12
    return ref


def test_odin_cluster_is_exact():
    y, s = _data(200_000, _odin, seed=10)
    res = _feed(OODMeter(), y, s, chunks=5)
    assert res["auroc_bound"] == 0
    _check(res, y, s)


@pytest.mark.parametrize("f", [
    pytest.param(lambda t: 1e4 + 0.4 * t, id="near_1e4"),
    pytest.param(lambda t: 1.0 - 1e-5 / (1.0 + np.exp(t)), id="sigmoid_near_1"),
    pytest.param(lambda t: -30.0 + 0.05 * np.tanh(t / 2), id="energy_near_-30"),
])
def test_narrow_at_large_or_saturated_values_is_exact(f):
    y, s = _data(200_000, f, seed=11)
    assert np.unique(s).size > 10  # not a trivial tie case
    res = _feed(OODMeter(), y, s, chunks=4)
    assert res["auroc_bound"] == 0
    _check(res, y, s)


def test_heavy_ties_exact():
    y, s = _data(150_000, lambda t: np.round(t, 1), seed=12)
    _assert_matches(_feed(OODMeter(), y, s, chunks=4), y, s, tol=EXACT, tol_fpr=EXACT)
    y, t = _data(150_000, lambda t: t, seed=13)
    s = np.float32([-1.0, 0.25, 2.0])[np.digitize(t, [0.0, 1.0])]
    _assert_matches(_feed(OODMeter(), y, s, chunks=3), y, s, tol=EXACT, tol_fpr=EXACT)


@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce")  # sklearn's isfinite
def test_signed_zeros_tie_and_infinities():
    y, s = _data(100_000, lambda t: np.round(t), seed=14)
    rng = np.random.default_rng(15)
    zero = s == 0
    s[zero & (rng.random(s.size) < 0.5)] = np.float32(-0.0)
    assert np.signbit(s[zero]).any() and not np.signbit(s[zero]).all()
    s[rng.random(s.size) < 0.01] = np.inf  # both labels at +-inf
    s[rng.random(s.size) < 0.01] = -np.inf
    res = _feed(OODMeter(), y, s, chunks=4)
    _assert_matches(res, y, s, tol=EXACT, tol_fpr=EXACT)
    plus = np.where(s == 0, np.float32(0.0), s)  # every zero as +0.0: the same meter
    assert _feed(OODMeter(), y, plus, chunks=4) == res


def test_broad_and_odin_mixture():
    y1, s1 = _data(100_000, _broad, seed=16)
    y2, s2 = _data(100_000, _odin, seed=17)
    order = np.random.default_rng(18).permutation(200_000)
    y, s = np.concatenate([y1, y2])[order], np.concatenate([s1, s2])[order]
    _check(_feed(OODMeter(), y, s, chunks=6), y, s)


def test_late_narrow_cluster_within_bound():
    y1, s1 = _data(120_000, lambda t: 2.0 * t, seed=19)  # broad first: nothing heavy
    y2, s2 = _data(120_000, lambda t: 1.5 + 1e-4 * np.tanh(t), seed=20)  # then a cluster
    y, s = np.concatenate([y1, y2]), np.concatenate([s1, s2])
    m = OODMeter()
    _feed(m, y1, s1, chunks=3)
    res = _feed(m, y2, s2, chunks=3)
    assert m.bins  # the cluster's bins were refined late
    _check(res, y, s)


def test_imbalanced_narrow():
    y, s = _data(300_000, lambda t: 0.5 + 1e-4 * np.tanh(t), seed=21, rate=0.001, sep=2.0)
    assert 200 < y.sum() < 400
    _check(_feed(OODMeter(), y, s, chunks=5), y, s)


def test_valid_mask_ignores_nan_pixels():
    y, s = _data(120_000, _odin, seed=22)
    valid = np.random.default_rng(23).random(y.size) < 0.7
    s[~valid] = np.nan  # would raise if counted
    res = _feed(OODMeter(), y.reshape(-1, 200), s.reshape(-1, 200), chunks=4,
                valid=valid.reshape(-1, 200))
    _check(res, y[valid], s[valid])


def test_merge_narrow_and_broad():
    y1, s1 = _data(100_000, _odin, seed=24)
    y2, s2 = _data(100_000, _broad, seed=25)
    a, b = OODMeter(), OODMeter()
    _feed(a, y1, s1, chunks=3)
    _feed(b, y2, s2, chunks=3)
    assert a.bins and OODMeter().merge(a).compute() == a.compute()
    y, s = np.concatenate([y1, y2]), np.concatenate([s1, s2])
    _check(a.merge(b).compute(), y, s)
    assert OODMeter().merge(b).compute() == b.compute()


def _shard(rank):
    """Rank 0's data is an ODIN cluster, rank 1's broad logits."""
    return _data(100_000, (_odin, _broad)[rank], seed=26 + rank)


def _worker(rank, world, init_file, out):
    """Feed this rank's shard, all_reduce, and let rank 0 write compute() to ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = OODMeter()
        _feed(m, *_shard(rank), chunks=3)
        res = m.all_reduce().compute()
        if rank == 0:
            out.write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes(tmp_path):
    out = tmp_path / "res.json"
    spawn(_worker, args=(2, tmp_path / "init", out), nprocs=2)
    (y1, s1), (y2, s2) = _shard(0), _shard(1)
    _check(json.loads(out.read_text()), np.concatenate([y1, y2]), np.concatenate([s1, s2]))


def test_float16_scores_narrow():
    y, s16 = _data(150_000, lambda t: 0.9 + 1e-2 * np.tanh(t), seed=28, dtype=np.float16)
    res = _feed(OODMeter(), y, s16, chunks=4)
    _check(res, y, s16.astype(np.float32))


def test_memory_bounded_under_changing_offsets():
    rng = np.random.default_rng(29)
    m, ys, ss = OODMeter(max_refined=16), [], []
    for i in range(30):
        y, s = _data(8_000, lambda t, i=i: 1e3 * t + 5e5 * (i % 7), seed=100 + i)
        m.update(torch.from_numpy(s), torch.from_numpy(y), probs=torch.from_numpy(
            rng.random(s.size).astype(np.float32)))
        ys.append(y)
        ss.append(s)
        length = m.ncoarse + len(m.bins) * m.nfine
        assert len(m.bins) <= m.max_refined
        assert [t.numel() for t in m.state_tensors()] == [2 * length, length]
    assert len(m.bins) == m.max_refined  # the bound was reached, not just never approached
    y, s = np.concatenate(ys), np.concatenate(ss)
    res, ref = m.compute(), _reference(y, s)
    assert res["n_pos"] + res["n_neg"] == 30 * 8_000
    # Past max_refined the heavy bins stay coarse: the meter is then only as good as the
    # bound it reports (here AUROC is off by 8.0e-4 and AP by 9.3e-3, beyond TOL).
    assert 0 < res["auroc_bound"] and abs(res["auroc"] - ref["auroc"]) <= res["auroc_bound"]


def test_refinement_is_what_makes_odin_exact():
    y, s = _data(200_000, _odin, seed=30)
    ref = _reference(y, s)
    coarse = _feed(OODMeter(max_refined=0), y, s, chunks=5)
    fine = _feed(OODMeter(), y, s, chunks=5)
    assert abs(coarse["auroc"] - ref["auroc"]) > 1e-3
    assert abs(coarse["auroc"] - ref["auroc"]) <= coarse["auroc_bound"] + 1e-12
    assert fine["auroc"] == pytest.approx(ref["auroc"], abs=EXACT)


# --------------------------------------------------------------------------- coarse bins: AP


def test_interleaved_precision_sum_by_brute_force():
    from obsnet.metrics.ood import _interleaved_precision_sum
    # p positives spread evenly among n negatives (m = (p + n) / p integer): the k-th positive
    # ends the k-th group of m pixels after tp0 + fp0 pixels ranked above
    for tp0, fp0, p, n in ((0, 0, 3, 6), (5, 7, 4, 4), (100, 3, 2, 0), (0, 50, 5, 20)):
        m = (p + n) // p
        brute = sum((tp0 + k) / (tp0 + fp0 + k * m) for k in range(1, p + 1))
        got = _interleaved_precision_sum(np.array([tp0], float), np.array([fp0], float),
                                         np.array([p], float), np.array([n], float))[0]
        assert got == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "narrow", "rounded"])
def test_ap_of_a_million_scores(kind):
    """Most pixels stay in coarse bins here: AP takes the bins that hold distinct scores as
    interleaved and the tied ones as ties, within 1e-5 of scikit-learn."""
    rng = np.random.default_rng(3)
    n = 1_000_000
    y = rng.random(n) < 0.1
    z = rng.standard_normal(n) + 1.5 * y
    s = {"gaussian": z, "narrow": 0.9166 + 1e-3 * z, "rounded": np.round(z, 3)}[kind]
    s = s.astype(np.float32)
    m = OODMeter()
    for part in np.array_split(np.arange(n), 8):  # batches, as an evaluation feeds them
        m.update(torch.from_numpy(s[part]), torch.from_numpy(y[part]))
    r = m.compute()
    assert abs(r["ap"] - average_precision_score(y, s)) < 1e-5
    assert abs(r["ap_neg"] - average_precision_score(~y, -s)) < 1e-5
    assert abs(r["auroc"] - roc_auc_score(y, s)) < 1e-6


def test_bins_with_one_sampled_score_are_ties_and_distinct_ones_are_not():
    m = OODMeter(max_refined=0)
    base = torch.tensor(1.0)
    m.update(base.repeat(50), torch.arange(50) % 2 == 0)
    bin_of = lambda v: int(score_bins(torch.tensor([v]), OODMeter.COARSE_BITS)[0])  # noqa: E731
    assert bool(m._tied()[bin_of(1.0)])
    near = float(np.nextafter(np.float32(1.0), np.float32(2.0)))  # same coarse bin, another float
    assert bin_of(near) == bin_of(1.0)
    other = OODMeter(max_refined=0)
    other.update(torch.tensor([near] * 10), torch.zeros(10, dtype=torch.bool))
    assert bool(other._tied()[bin_of(near)])
    m.merge(other)  # two ranks saw two different scores in one bin: no longer a tie
    assert not bool(m._tied()[bin_of(1.0)])
