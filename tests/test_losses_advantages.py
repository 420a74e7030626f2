"""RLOO and REINFORCE++ advantages against float64 NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import group_advantages, reinforce_pp_advantages, rloo_advantages
from tests.test_losses_common import RTOL32


def ref_rloo(rewards, group_size):
    r = np.asarray(rewards, np.float64)
    out = np.zeros_like(r)
    for g in range(0, len(r), group_size):
        for i in range(g, g + group_size):
            others = [r[j] for j in range(g, g + group_size) if j != i]
            out[i] = r[i] - np.mean(others)
    return out


def ref_reinforce_pp(rewards, group_size=None):
    r = np.asarray(rewards, np.float64)
    if group_size is not None:
        groups = r.reshape(-1, group_size)
        r = (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)
    else:
        r = r - r.mean()
    return r / np.std(r, ddof=1)


def test_rloo_matches_reference_and_hand_values():
    rewards = np.random.default_rng(0).normal(size=12).astype(np.float32)
    for g in (2, 3, 4):
        got = jax.jit(functools.partial(rloo_advantages, group_size=g))(rewards)
        np.testing.assert_allclose(got, ref_rloo(rewards, g), rtol=1e-5, atol=1e-6)
    # 0/1 rewards, G = 4, one correct: it beats the others' mean 0 by 1; each
    # wrong one trails the mean of {1, 0, 0} by 1/3.
    got = rloo_advantages(jnp.array([1.0, 0.0, 0.0, 0.0]), 4)
    np.testing.assert_allclose(got, [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=RTOL32)


def test_rloo_equal_rewards_give_exactly_zero_and_bad_group_size_is_refused():
    assert np.all(np.asarray(rloo_advantages(jnp.full(6, 0.1), 3)) == 0.0)
    got = np.asarray(rloo_advantages(jnp.array([0.7, 0.7, 0.0, 1.0]), 2))
    assert np.all(got[:2] == 0.0) and np.all(got[2:] != 0.0)
    with pytest.raises(ValueError, match="group_size must be >= 2.*got 1"):
        rloo_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple"):
        rloo_advantages(jnp.zeros(6), 4)


def test_reinforce_pp_matches_reference():
    rewards = np.random.default_rng(1).normal(size=12).astype(np.float32)
    got = jax.jit(reinforce_pp_advantages)(rewards)
    np.testing.assert_allclose(got, ref_reinforce_pp(rewards), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.mean(got), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.std(np.float64(got), ddof=1), 1.0, rtol=1e-5)
    for g in (2, 4):
        got = jax.jit(functools.partial(reinforce_pp_advantages, group_size=g))(rewards)
        np.testing.assert_allclose(got, ref_reinforce_pp(rewards, g), rtol=1e-5, atol=1e-6)
    # One group spanning the batch is GRPO's batch-scaled advantage without eps.
    np.testing.assert_allclose(reinforce_pp_advantages(rewards),
                               group_advantages(rewards, 12, scale="batch", eps=0.0), rtol=1e-5, atol=1e-6)


def test_reinforce_pp_hand_values_and_edge_cases():
    # Grouped: centred [0.5, −0.5, 0, 0], batch std (ddof 1) of that = sqrt(1/6).
    got = reinforce_pp_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]), group_size=2)
    np.testing.assert_allclose(got, [0.5 * np.sqrt(6), -0.5 * np.sqrt(6), 0.0, 0.0], rtol=RTOL32)
    # No spread anywhere: exactly 0, not NaN.
    assert np.all(np.asarray(reinforce_pp_advantages(jnp.full(4, 0.3))) == 0.0)
    assert np.all(np.asarray(reinforce_pp_advantages(jnp.array([1.0, 1.0, 0.2, 0.2]), group_size=2)) == 0.0)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        reinforce_pp_advantages(jnp.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="batch >= 2"):
        reinforce_pp_advantages(jnp.zeros(1))
    with pytest.raises(ValueError, match="multiple"):
        reinforce_pp_advantages(jnp.zeros(6), group_size=4)
