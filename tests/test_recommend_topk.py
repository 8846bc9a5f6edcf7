"""The numpy top-k kernels against a brute-force full sort (no Spark)."""

from __future__ import annotations

import numpy as np
import pytest

from mf_spark.recommend.topk import (
    block_top_k,
    csr_from_pairs,
    decode_keys,
    merge_top_k,
    merge_top_k_lists,
    normalize_rows,
    score_keys,
)


def reference_scores(src, dst):
    """The documented score: exact float64 products of the float32 factors, summed by one numpy
    reduction per pair along the factor axis, then float32; here one pair at a time."""
    src, dst = np.asarray(src, np.float32).astype(np.float64), np.asarray(dst, np.float32).astype(np.float64)
    scores = np.empty((src.shape[0], dst.shape[0]), np.float32)
    for i in range(src.shape[0]):
        for j in range(dst.shape[0]):
            scores[i, j] = (src[i] * dst[j]).sum()
    return scores


def brute_force(src_ids, src, dst_ids, dst, k, masked=frozenset()):
    """Every pair scored, masked pairs dropped, full sort by (-score, dst id), first k per src."""
    scores = reference_scores(src, dst)
    expected = []
    for row, s in enumerate(src_ids):
        cands = [(-float(scores[row, col]), int(d)) for col, d in enumerate(dst_ids)
                 if (int(s), int(d)) not in masked and np.isfinite(scores[row, col])]
        for rank, (neg, d) in enumerate(sorted(cands)[:k], start=1):
            expected.append((int(s), rank, d, -neg))
    return expected


def as_rows(result):
    return list(zip(result.src.tolist(), result.rank.tolist(), result.dst.tolist(), result.score.tolist()))


def assert_same(result, expected):
    got = as_rows(result)
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    np.testing.assert_allclose([g[3] for g in got], [e[3] for e in expected], rtol=1e-5, atol=1e-5)


def seen_csr(src_ids, pairs):
    src_of = np.array([p[0] for p in pairs], dtype=np.int64)
    dst_of = np.array([p[1] for p in pairs], dtype=np.int64)
    order = np.argsort(src_ids)
    indptr, grouped = csr_from_pairs(np.asarray(src_ids)[order], src_of, dst_of)
    return order, indptr, grouped


def test_score_keys_order_is_score_then_lower_column_and_decodes_exactly():
    scores = np.array([1.5, -2.0, 1.5, -0.0, 0.0, -np.inf, 3e38, -1e-30], dtype=np.float32)
    cols = np.arange(len(scores))
    keys = score_keys(scores, cols)
    by_key = sorted(range(len(scores)), key=lambda i: keys[i], reverse=True)
    expected = sorted(range(len(scores)), key=lambda i: (-(float(scores[i]) + 0.0), cols[i]))
    assert by_key == expected
    decoded, decoded_cols = decode_keys(keys)
    np.testing.assert_array_equal(decoded, scores + np.float32(0.0))
    np.testing.assert_array_equal(decoded_cols, cols)


@pytest.mark.parametrize("k", [1, 3, 10, 40])
@pytest.mark.parametrize("tiles", [(1 << 21, 50000), (7, 3), (64, 5)])
def test_block_top_k_equals_brute_force(k, tiles):
    rng = np.random.default_rng(k)
    src_ids = rng.permutation(100)[:23].astype(np.int32)  # unsorted, non-contiguous ids
    dst_ids = np.sort(rng.choice(1000, 31, replace=False)).astype(np.int32)
    src, dst = rng.normal(size=(23, 5)).astype(np.float32), rng.normal(size=(31, 5)).astype(np.float32)
    tile_elements, max_cols = tiles
    result = block_top_k(src_ids, src, dst_ids, dst, k, tile_elements=tile_elements,
                         max_tile_columns=max_cols)
    assert_same(result, brute_force(src_ids, src, dst_ids, dst, k))


@pytest.mark.parametrize("tiles", [(1 << 21, 50000), (5, 2)])
def test_seen_pairs_and_self_are_masked_before_the_top_k(tiles):
    rng = np.random.default_rng(3)
    ids = np.arange(20, dtype=np.int32)
    src, dst = rng.normal(size=(20, 4)).astype(np.float32), rng.normal(size=(20, 4)).astype(np.float32)
    pairs = {(int(u), int(i)) for u in ids for i in rng.choice(20, 6, replace=False)}
    pairs |= {(3, 99)}  # a seen id absent from the catalogue is ignored
    order, indptr, grouped = seen_csr(ids, sorted(pairs))
    result = block_top_k(ids[order], src[order], ids, dst, 5, seen_indptr=indptr, seen_dst=grouped,
                         exclude_self=True, tile_elements=tiles[0], max_tile_columns=tiles[1])
    masked = pairs | {(int(i), int(i)) for i in ids}
    assert_same(result, brute_force(ids[order], src[order], ids, dst, 5, masked))


def test_fewer_candidates_than_k_gives_fewer_rows():
    ids = np.arange(4, dtype=np.int32)
    rng = np.random.default_rng(0)
    src, dst = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    pairs = [(0, 0), (0, 1), (0, 2), (1, 0)]  # src 0 has one candidate left, src 1 three
    _, indptr, grouped = seen_csr(ids[:2], pairs)
    result = block_top_k(ids[:2], src, ids, dst, 10, seen_indptr=indptr, seen_dst=grouped, tile_elements=2,
                         max_tile_columns=1)
    assert result.src.tolist() == [0, 1, 1, 1] and result.rank.tolist() == [1, 1, 2, 3]
    assert_same(result, brute_force(ids[:2], src, ids, dst, 10, set(pairs)))


def test_ties_are_broken_by_lower_dst_id_across_tiles():
    # Integer factors: exact float32 scores, many equal ones, including +0.0 and -0.0.
    rng = np.random.default_rng(5)
    src = rng.integers(-1, 2, size=(16, 3)).astype(np.float32)
    dst = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
    src[0] = 0.0  # every score of src 0 is a zero of some sign: all tie
    dst_ids = np.arange(0, 80, 2, dtype=np.int32)
    src_ids = np.arange(16, dtype=np.int32)
    expected = brute_force(src_ids, src, dst_ids, dst, 7)
    for tile_elements, max_cols in [(1 << 21, 50000), (3, 2), (16, 7)]:
        assert as_rows(block_top_k(src_ids, src, dst_ids, dst, 7, tile_elements=tile_elements,
                                   max_tile_columns=max_cols)) == expected
    assert [e[2] for e in expected if e[0] == 0] == [0, 2, 4, 6, 8, 10, 12]


def _identical_groups(n_groups=7, copies=9, rank=24, n_src=300, seed=2):
    """dst vectors in groups of identical copies (ids interleaved), random non-integer values: a float32
    GEMM gives one vector different last bits at different columns, the documented score does not."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_groups, rank)).astype(np.float32)
    dst = base[np.arange(n_groups * copies) % n_groups]
    src = rng.standard_normal((n_src, rank)).astype(np.float32)
    return np.arange(n_src, dtype=np.int32), src, np.arange(n_groups * copies, dtype=np.int32), dst


def test_scores_and_ties_do_not_depend_on_tiles_or_on_the_other_rows():
    """The GEMM's rounding depends on a pair's place in the tile: identical item vectors scored
    differently, a higher id won their tie, and lists changed with the block and chunk sizes."""
    src_ids, src, dst_ids, dst = _identical_groups()
    expected = brute_force(src_ids, src, dst_ids, dst, 10)
    for tile_elements, max_cols in [(1 << 21, 16384), (7, 3), (640, 64)]:
        assert as_rows(block_top_k(src_ids, src, dst_ids, dst, 10, tile_elements=tile_elements,
                                   max_tile_columns=max_cols)) == expected
    # rows scored in other company (smaller blocks) and dst in chunks merged: the same bits
    parts = [block_top_k(src_ids[a:a + 7], src[a:a + 7], dst_ids[c::4], dst[c::4], 10)
             for a in range(0, len(src_ids), 7) for c in range(4)]
    columns = (np.concatenate([getattr(p, field) for p in parts]) for field in ("src", "dst", "score"))
    assert as_rows(merge_top_k(*columns, 10)) == expected
    # the same lists merged at once, and folded two at a time as a crossing task does
    lists = [(p.src, p.dst, p.score) for p in parts]
    assert as_rows(merge_top_k_lists(lists, 10)) == expected
    folded = lists[0]
    for found in lists[1:]:
        merged = merge_top_k_lists((folded, found), 10)
        folded = (merged.src, merged.dst, merged.score)
    assert as_rows(merge_top_k_lists([folded], 10)) == expected
    # within each list, equal scores come in ascending id order
    assert all(a[2] < b[2] for a, b in zip(expected, expected[1:]) if a[0] == b[0] and a[3] == b[3])
    assert sum(a[3] == b[3] for a, b in zip(expected, expected[1:]) if a[0] == b[0]) > 1000


def test_a_tie_wider_than_the_rescoring_margin_is_scored_exactly():
    """40 copies of the best vector: the GEMM candidates (k + RESCORE_MARGIN) are all copies, so the
    margin cannot show that a copy left out scores lower; the row is scored exactly over all columns."""
    from mf_spark.recommend import topk

    src_ids, src, dst_ids, dst = _identical_groups(n_groups=3, copies=40, n_src=5)
    assert 40 > 5 + topk.RESCORE_MARGIN
    expected = brute_force(src_ids, src, dst_ids, dst, 5)
    for tile_elements, max_cols in [(1 << 21, 16384), (16, 8)]:
        assert as_rows(block_top_k(src_ids, src, dst_ids, dst, 5, tile_elements=tile_elements,
                                   max_tile_columns=max_cols)) == expected
    # the best group's lowest ids: ids are interleaved by group (id % 3)
    best_group = expected[0][2] % 3
    assert [e[2] for e in expected if e[0] == 0] == [best_group + 3 * i for i in range(5)]


def test_non_finite_factors_are_skipped():
    ids = np.arange(3, dtype=np.int32)
    src = np.array([[1, 0], [np.nan, 1], [0, 1]], dtype=np.float32)
    dst = np.array([[1, 1], [np.inf, 0], [0, 2]], dtype=np.float32)
    result = block_top_k(ids, src, ids, dst, 3)
    assert as_rows(result) == [(0, 1, 0, 1.0), (0, 2, 2, 0.0), (2, 1, 2, 2.0), (2, 2, 0, 1.0)]


def test_unsorted_dst_ids_are_rejected():
    with pytest.raises(ValueError, match="sorted"):
        ones = np.ones((2, 2), np.float32)
        block_top_k(np.arange(2), ones, np.array([3, 1]), ones, 1)


def test_merge_top_k_is_exact_over_chunks():
    rng = np.random.default_rng(9)
    ids = np.arange(12, dtype=np.int32)
    src = rng.integers(-2, 3, size=(12, 2)).astype(np.float32)
    dst = rng.integers(-2, 3, size=(30, 2)).astype(np.float32)
    dst_ids = np.arange(30, dtype=np.int32)
    parts = [block_top_k(ids, src, dst_ids[c::3], dst[c::3], 4) for c in range(3)]
    columns = (np.concatenate([getattr(p, field) for p in parts]) for field in ("src", "dst", "score"))
    merged = merge_top_k(*columns, 4)
    assert as_rows(merged) == brute_force(ids, src, dst_ids, dst, 4)


def test_normalize_rows_keeps_zero_rows():
    out = normalize_rows(np.array([[3, 4], [0, 0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]])


# Mutation testing found these branches unguarded (a changed line left every test passing).

def test_rescue_when_the_gemm_underestimates_within_its_error_bound(monkeypatch):
    """The exact rescue must fire when a true tie is split by GEMM rounding within (r+1) * 2**-24 of the
    scores; this machine's OpenBLAS rounds identical rows identically, so a fake GEMM makes the split."""
    from mf_spark.recommend import topk

    rank = 4
    src = np.full((1, rank), 0.5, np.float32)
    dst = np.full((30, rank), 0.5, np.float32)  # every exact score is 1.0
    real_matmul = np.matmul

    def gemm(a, b, out):  # ids 9..29 4 ulp low, ids 0..8 5 ulp low: within the bound, wrong order
        real_matmul(a, b, out=out)
        out[:, 9:] = 1.0 - 4 * 2.0**-24
        out[:, :9] = 1.0 - 5 * 2.0**-24
        return out

    monkeypatch.setattr(topk.np, "matmul", gemm)
    result = block_top_k(np.array([0]), src, np.arange(30, dtype=np.int32), dst, 5)
    assert result.dst.tolist() == [0, 1, 2, 3, 4] and result.score.tolist() == [1.0] * 5


def test_a_non_finite_dst_row_does_not_switch_off_the_exact_rescue(monkeypatch):
    """Not zeroed, an infinite dst row made every error bound infinite, and the exact rescue never ran."""
    from mf_spark.recommend import topk

    src_ids, src, _, dst = _identical_groups(n_groups=3, copies=40, n_src=5)
    dst = np.vstack([dst, np.full((1, dst.shape[1]), np.inf, np.float32)])
    calls = []
    real = topk._exact_row_keys
    monkeypatch.setattr(topk, "_exact_row_keys", lambda *a: calls.append(1) or real(*a))
    block_top_k(src_ids, src, np.arange(len(dst), dtype=np.int32), dst, 5)
    assert len(calls) == len(src_ids)  # every row's tie is wider than the margin


def test_a_seen_id_between_the_chunks_ids_masks_nothing():
    src, dst = np.array([[1.0]], np.float32), np.array([[1.0], [2.0], [3.0]], np.float32)
    result = block_top_k(np.array([7]), src, np.array([0, 2, 4], np.int32), dst, 1,
                         seen_indptr=np.array([0, 1]), seen_dst=np.array([3]))
    assert result.dst.tolist() == [4]


def test_exclude_self_for_a_src_outside_the_dst_chunk_masks_nothing():
    src, dst = np.array([[1.0]], np.float32), np.array([[1.0], [2.0], [3.0]], np.float32)
    result = block_top_k(np.array([3]), src, np.array([0, 2, 4], np.int32), dst, 1, exclude_self=True)
    assert result.dst.tolist() == [4]


def test_csr_from_pairs_drops_rows_not_asked_for():
    indptr, grouped = csr_from_pairs(np.array([1, 5]), np.array([1, 3, 5, 9]), np.array([10, 30, 50, 90]))
    assert indptr.tolist() == [0, 1, 2] and grouped.tolist() == [10, 50]


def test_duplicate_dst_ids_are_refused():
    ones = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="sorted"):
        block_top_k(np.arange(2), ones, np.array([1, 1]), ones, 1)
