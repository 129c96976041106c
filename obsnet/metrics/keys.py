"""Order-preserving integer keys of float32 scores, and the score bins built on them (shared
by ``OODMeter`` and the per-image counts of ``obsnet.metrics.risk``)."""
import numpy as np
import torch


def order_key(scores: torch.Tensor) -> torch.Tensor:
    """int32 whose *unsigned* order is the order of the float32 scores (-0.0 and +0.0 equal).

    The float32 bit pattern with all bits flipped for negative values and only the sign bit
    flipped otherwise orders like the floats when read as an unsigned integer; distinct floats
    give distinct keys and equal floats the same key.
    """
    # "+ 0.0" turns -0.0 into +0.0; it is also the one fresh buffer the rest updates in place.
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)
    flip = bits >> 31  # arithmetic shift: all ones for negatives, zero otherwise
    flip |= -(1 << 31)
    bits ^= flip
    return bits


def bin_edge_scores(keys: np.ndarray) -> np.ndarray:
    """float32 scores of unsigned order keys (``order_key``'s inverse); the keys above +inf's
    (NaN patterns) give +inf."""
    keys = np.asarray(keys, dtype=np.uint64).astype(np.uint32)
    positive = keys >= np.uint32(1 << 31)
    bits = np.where(positive, keys ^ np.uint32(1 << 31), ~keys).astype(np.uint32)
    values = bits.view(np.float32)
    return np.where(np.isnan(values), np.float32(np.inf), values).astype(np.float32)


def score_bins(scores: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Order-preserving int32 bin indices in [0, 2**num_bits): the top ``num_bits`` bits of
    ``order_key``. Bins have a constant *relative* width at every magnitude."""
    bits = order_key(scores)
    bits >>= 32 - num_bits  # arithmetic, so the sign bit smears: mask it off
    bits &= (1 << num_bits) - 1
    return bits
