"""Shared helpers for the loss tests (finite differences, random masks), and
a check that the finite-difference helper itself can fail.

Tolerances: float32 results are compared with float64 NumPy references at
rtol = 1e-6 (about 8 float32 ulps, room for a few roundings in a short
reduction) plus an atol of the same order times the magnitude of the terms
where a sum can cancel to near zero. Gradients are checked in float64 (inside
`jax.enable_x64`, which does not leak to other tests) against central
differences with step 1e-6: truncation error ~h² and rounding ~1e-16/h, so
~1e-10 absolute on O(1) gradients; we allow 1e-7.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

B, T = 4, 6  # one shape for most tests, so jit compiles are reused
RTOL32 = 1e-6
FD_STEP = 1e-6
FD_TOL = 1e-7


def right_padded_mask(rng, batch=B, time=T, *, empty_row=None):
    """Random 0/1 mask, each row valid for a prefix of length 1..time."""
    lengths = rng.integers(1, time + 1, size=batch)
    mask = (np.arange(time)[None, :] < lengths[:, None]).astype(np.float32)
    if empty_row is not None:
        mask[empty_row] = 0.0
    return mask


def holey_mask(rng, batch=B, time=T):
    """Random 0/1 mask with holes inside rows, at least one token per row."""
    mask = (rng.random((batch, time)) < 0.6).astype(np.float32)
    mask[np.arange(batch), rng.integers(0, time, size=batch)] = 1.0
    return mask


def fd_grad(f, x):
    """Central finite differences of scalar `f` (NumPy float64 in and out)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += FD_STEP
        minus[idx] -= FD_STEP
        grad[idx] = (f(plus) - f(minus)) / (2 * FD_STEP)
    return grad


def check_grad(loss_of, x):
    """Compare jax.grad of `loss_of(x) -> scalar` with finite differences, in float64."""
    with jax.enable_x64(True):
        x64 = np.asarray(x, np.float64)
        loss_of = jax.jit(loss_of)
        analytic = np.asarray(jax.jit(jax.grad(loss_of))(jnp.asarray(x64)))
        numeric = fd_grad(lambda v: float(loss_of(jnp.asarray(v))), x64)
    assert analytic.dtype == np.float64
    np.testing.assert_allclose(analytic, numeric, rtol=FD_TOL, atol=FD_TOL)
    return analytic


def test_check_grad_catches_a_wrong_gradient():
    @jax.custom_vjp
    def wrong_square(x):
        return jnp.sum(x**2)

    wrong_square.defvjp(lambda x: (wrong_square(x), x), lambda x, g: (g * 2.001 * x,))
    x = np.array([0.3, -1.2, 2.0])
    check_grad(lambda v: jnp.sum(v**2), x)
    with pytest.raises(AssertionError):
        check_grad(wrong_square, x)


def test_x64_does_not_leak():
    check_grad(lambda v: jnp.sum(v**3), np.array([1.0, 2.0]))
    assert jnp.asarray(np.ones(2)).dtype == jnp.float32
