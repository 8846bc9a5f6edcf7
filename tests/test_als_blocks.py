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


def test_a_large_partition_is_encoded_in_bounded_chunks_and_batches():
    """A partition's chunks went out as one Arrow batch: past 2 GiB of payloads (about 67M ratings, one
    large unsplittable file) pyarrow could not build it and the fit failed."""
    import pickle

    import pyarrow as pa

    from mf_spark.als.blocks import _STATS, USER_SIDE, _encode_partition

    rng = np.random.default_rng(3)
    n = 1000
    batch = pa.record_batch([pa.array(rng.integers(0, 50, n), pa.int32()), pa.array(rng.integers(0, 40, n), pa.int32()),
                             pa.array(rng.random(n))], names=["user", "item", "rating"])
    out = list(_encode_partition(iter([batch.slice(0, 400), batch.slice(400)]), 3, 2,
                                 max_chunk_ratings=64, max_batch_bytes=4096))
    # a batch closes once its payloads reach max_batch_bytes: at most one chunk (64 ratings) beyond it
    assert len(out) > 3 and all(sum(map(len, b.column(2).to_pylist())) < 4096 + 64 * 16 + 200 for b in out)
    rows = [(s, blk, pickle.loads(p)) for b in out for s, blk, p in zip(*(c.to_pylist() for c in b.columns))]
    assert [r[2] for r in rows if r[0] == _STATS] == [[n, 0, 0, 0]]
    user_chunks = [r[2] for r in rows if r[0] == USER_SIDE]
    assert max(len(c[0]) for c in user_chunks) == 64
    got = sorted(zip(*(np.concatenate([c[i] for c in user_chunks]).tolist() for i in range(3))))
    assert got == sorted(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), batch.column(2).to_pylist()))


def test_duplicate_runs_are_summed_left_to_right_as_ordered_sum():
    """np.add.reduceat adds runs of more than 8 pairwise; ordered_sum (fold-in, ingest) adds left to
    right, so the two could disagree in the last bit of a heavily repeated pair's strength."""
    from mf_spark.als.blocks import sum_runs

    rng = np.random.default_rng(0)
    runs = [np.sort(rng.random(n) * 10.0 ** rng.integers(-8, 8, n)) for n in (1, 3, 8, 9, 20, 20, 20, 20, 50)]
    values = np.concatenate(runs)
    starts = np.cumsum([0] + [len(r) for r in runs[:-1]])
    expected = []
    for run in runs:
        total = 0.0
        for v in run:  # the order of ordered_sum's aggregate
            total += v
        expected.append(total)
    assert sum_runs(values, starts).tolist() == expected
    assert np.add.reduceat(values, starts).tolist() != expected  # the case is one that tells them apart


def test_long_duplicate_runs_take_the_one_pass_path_and_still_sum_left_to_right():
    """The left-to-right summation looped once per position of the longest run: one pair repeated 1M
    times took 3.5 s per side of every fit (np.add.reduceat: under a millisecond). Runs longer than
    SHORT_RUN are now added by np.add.accumulate; this checks that path gives the same sums."""
    from mf_spark.als.blocks import SHORT_RUN, sum_runs

    rng = np.random.default_rng(1)
    lengths = [3, SHORT_RUN, SHORT_RUN + 1, 1_000_000]  # short, the last vectorised length, the first beyond
    values = np.sort(rng.random(sum(lengths)) * 10.0 ** rng.integers(-8, 8, sum(lengths)))
    starts = np.cumsum([0, *lengths[:-1]])
    expected = []
    for start, length in zip(starts, lengths):
        total = 0.0
        for v in values[start : start + length].tolist():  # plain left to right, as ordered_sum
            total += v
        expected.append(total)
    assert sum_runs(values, starts).tolist() == expected
