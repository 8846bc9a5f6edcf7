"""Rating blocks: ``make_in_block`` against a plain-Python reference, and its independence of row order."""

from __future__ import annotations

import numpy as np
import pytest

from mf_spark.als.blocks import block_of, make_in_block

INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def reference_in_block(dst, src, ratings, num_src_blocks):
    """Dict-based build: summed duplicates, CSR rows by dst id, src ordered by (src block, id)."""
    summed: dict[tuple[int, int], float] = {}
    for d, s, r in sorted(zip(dst.tolist(), src.tolist(), ratings.tolist())):
        summed[(d, s)] = summed.get((d, s), 0.0) + r
    src_ids = sorted({s for _, s in summed}, key=lambda s: (s % num_src_blocks, s))
    local = {s: i for i, s in enumerate(src_ids)}
    dst_ids = sorted({d for d, _ in summed})
    rows = {d: [] for d in dst_ids}
    for (d, s), r in sorted(summed.items()):
        rows[d].append((local[s], r))
    return dst_ids, rows, src_ids


@pytest.mark.parametrize("id_range", [(0, 50), (INT_MIN, INT_MAX), (-30, 30)])
def test_make_in_block_matches_reference_and_ignores_row_order(id_range):
    rng = np.random.default_rng(3)
    n = 2000
    dst = rng.integers(*id_range, n, endpoint=True)
    src = rng.integers(*id_range, n, endpoint=True)
    ratings = np.round(rng.normal(size=n) * 3, 3)
    block = make_in_block(dst, src, ratings, 4)

    dst_ids, rows, src_ids = reference_in_block(dst, src, ratings, 4)
    assert block.dst_ids.tolist() == dst_ids
    assert block.src_ids.tolist() == src_ids
    for row, d in enumerate(dst_ids):
        lo, hi = block.indptr[row], block.indptr[row + 1]
        assert block.indices[lo:hi].tolist() == [i for i, _ in rows[d]]
        np.testing.assert_allclose(block.ratings[lo:hi], [r for _, r in rows[d]], rtol=1e-6)
        assert block.n_positive[row] == sum(r > 0 for _, r in rows[d])
    counts = np.bincount(block_of(block.src_ids, 4), minlength=4)
    assert block.src_offsets.tolist() == [0, *np.cumsum(counts).tolist()]
    if id_range == (0, 50):
        assert block.nnz < n  # the small range repeats pairs: duplicates were summed

    perm = rng.permutation(n)
    shuffled = make_in_block(dst[perm], src[perm], ratings[perm], 4)
    for name in ("dst_ids", "indptr", "indices", "ratings", "src_ids", "src_offsets", "n_positive"):
        assert np.array_equal(getattr(shuffled, name), getattr(block, name)), name


def test_initial_factors_use_all_64_bits_of_the_seed():
    """MLlib's seed is a Long; cutting it to 32 bits gave seeds 7 and 7 + 2**32 the same factors."""
    from mf_spark.als.train import random_factors

    base = random_factors(5, 3, 7, side=0, block=0)
    assert not np.array_equal(base, random_factors(5, 3, 7 + 2**32, side=0, block=0))
    assert np.array_equal(base, random_factors(5, 3, 7, side=0, block=0))
    assert np.isfinite(random_factors(5, 3, -1, side=1, block=2)).all()  # negative seeds too
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, rtol=1e-6)
