"""Aggregation modes: formulas, absent rows, micro-batch accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import AGGREGATIONS, aggregate, aggregate_parts, safe_divide
from tests.test_losses_common import B, RTOL32, T, right_padded_mask

MODES = sorted(AGGREGATIONS)


def ref_aggregate(x, m, agg, norm_len=None):
    x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
    rows = [i for i in range(len(x)) if m[i].sum() > 0]
    sums = [float(np.sum(x[i] * m[i])) for i in rows]
    if agg == "token-mean":
        return sum(sums) / m.sum()
    if agg == "seq-mean-token-mean":
        return np.mean([s / m[i].sum() for s, i in zip(sums, rows)])
    if agg == "seq-mean-token-sum":
        return np.mean(sums)
    if agg == "seq-mean-token-sum-norm":
        return sum(sums) / (len(rows) * (x.shape[1] if norm_len is None else norm_len))
    raise AssertionError(agg)


@pytest.mark.parametrize("agg", MODES)
def test_matches_reference(agg):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T)).astype(np.float32)
    m = right_padded_mask(rng, empty_row=2)
    got = jax.jit(lambda x, m: aggregate(x, m, agg))(x, m)
    np.testing.assert_allclose(got, ref_aggregate(x, m, agg), rtol=RTOL32, atol=RTOL32)


def test_hand_computed():
    x = jnp.array([[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 0.0, 9.0]])
    m = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert float(aggregate(x, m, "token-mean")) == 10 / 4
    assert float(aggregate(x, m, "seq-mean-token-mean")) == (2 + 4) / 2
    assert float(aggregate(x, m, "seq-mean-token-sum")) == (6 + 4) / 2
    assert float(aggregate(x, m, "seq-mean-token-sum-norm")) == 10 / (2 * 4)
    assert float(aggregate(x, m, "seq-mean-token-sum-norm", norm_len=5)) == 10 / (2 * 5)


@pytest.mark.parametrize("agg", MODES)
def test_micro_batches_sum_to_full_batch(agg):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, T)).astype(np.float32)
    m = right_padded_mask(rng, batch=8, empty_row=5)
    full = aggregate(x, m, agg)
    num = den = 0.0
    for lo, hi in [(0, 3), (3, 4), (4, 8)]:  # uneven splits on purpose
        n, d = aggregate_parts(x[lo:hi], m[lo:hi], agg)
        num, den = num + n, den + d
    np.testing.assert_allclose(num / den, full, rtol=RTOL32)
    # The naive mean of micro-batch losses is *not* the full loss here.
    naive = np.mean([aggregate(x[lo:hi], m[lo:hi], agg) for lo, hi in [(0, 3), (3, 4), (4, 8)]])
    assert abs(naive - full) > 1e-3


@pytest.mark.parametrize("agg", MODES)
def test_masked_row_is_absent_and_padding_is_ignored(agg):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, T)).astype(np.float32)
    m = right_padded_mask(rng)
    x_with_garbage = np.where(m > 0, x, np.nan).astype(np.float32)
    padded_x = np.concatenate([x_with_garbage, np.full((2, T), np.inf, np.float32)])
    padded_m = np.concatenate([m, np.zeros((2, T), np.float32)])
    np.testing.assert_allclose(aggregate(padded_x, padded_m, agg), aggregate(x, m, agg), rtol=RTOL32)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_masked_equals_sliced(agg):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(B, T)).astype(np.float32)
    m = right_padded_mask(rng, time=4, batch=B)
    m = np.concatenate([m, np.zeros((B, T - 4), np.float32)], axis=1)
    np.testing.assert_allclose(aggregate(x, m, agg), aggregate(x[:, :4], m[:, :4], agg), rtol=RTOL32)


def test_all_masked_batch_is_zero_and_unknown_mode_is_refused():
    assert float(aggregate(jnp.ones((2, 3)), jnp.zeros((2, 3)), "seq-mean-token-mean")) == 0.0
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        aggregate(jnp.ones((2, 3)), jnp.ones((2, 3)), "sequence-mean")


def test_safe_divide_fractional_denominators():
    # A denominator in (0, 1) is divided by as it is (flooring it at 1 would
    # give 0.3 here); 0 gives 0 with a finite gradient.
    assert float(safe_divide(jnp.array(0.3), jnp.array(0.25))) == np.float32(0.3) / np.float32(0.25)
    assert float(safe_divide(jnp.array(0.0), jnp.array(0.0))) == 0.0
    grad = jax.grad(lambda n, d: safe_divide(n, d), argnums=(0, 1))(jnp.array(0.0), jnp.array(0.0))
    assert all(float(g) == 0.0 for g in grad)


@pytest.mark.parametrize("agg", MODES)
def test_soft_masks_with_fractional_counts(agg):
    """Weighted (soft) masks whose sums are below 1, per row and in total."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(B, T)).astype(np.float32)
    m = (rng.random((B, T)) * 0.2).astype(np.float32)  # every row sums to < 1.2, some < 1
    m[2] = 0.0
    assert np.any((m.sum(1) > 0) & (m.sum(1) < 1))
    np.testing.assert_allclose(aggregate(x, m, agg), ref_aggregate(x, m, agg), rtol=1e-5, atol=1e-6)
    tiny = m * 0.1  # total below 1 as well
    np.testing.assert_allclose(aggregate(x, tiny, agg), ref_aggregate(x, tiny, agg), rtol=1e-5, atol=1e-6)
