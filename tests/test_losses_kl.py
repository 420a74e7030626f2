"""KL estimators and KL-coefficient controllers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import KL_ESTIMATORS, adaptive_kl_controller, fixed_kl_controller, kl_penalty
from tests.test_losses_common import B, RTOL32, T, check_grad


def ref_kl(logps, ref_logps, kind):
    log_r = np.asarray(ref_logps, np.float64) - np.asarray(logps, np.float64)
    return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r}[kind]


@pytest.mark.parametrize("kind", sorted(KL_ESTIMATORS))
def test_matches_reference_and_gradient(kind):
    rng = np.random.default_rng(0)
    logps = -rng.random((B, T)).astype(np.float32) * 3
    ref_logps = -rng.random((B, T)).astype(np.float32) * 3
    got = jax.jit(lambda a, b: kl_penalty(a, b, kind=kind))(logps, ref_logps)
    np.testing.assert_allclose(got, ref_kl(logps, ref_logps, kind), rtol=RTOL32, atol=RTOL32)
    check_grad(lambda lp: jnp.sum(kl_penalty(lp, jnp.asarray(ref_logps, lp.dtype), kind=kind)), logps)


def test_hand_computed():
    # π_θ = 0.5, π_ref = 0.25: r = 0.5, log r = −log 2.
    lp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))
    np.testing.assert_allclose(kl_penalty(lp, ref, kind="k1"), [np.log(2)], rtol=RTOL32)
    np.testing.assert_allclose(kl_penalty(lp, ref, kind="k2"), [0.5 * np.log(2) ** 2], rtol=RTOL32)
    np.testing.assert_allclose(kl_penalty(lp, ref, kind="k3"), [0.5 - 1 + np.log(2)], rtol=RTOL32)
    assert float(kl_penalty(ref, ref, kind="k3")[0]) == 0.0


def test_k3_is_clamped_not_overflowing():
    out = kl_penalty(jnp.array([-200.0, 0.0]), jnp.array([0.0, -200.0]), kind="k3")
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0], np.exp(20.0) - 21.0, rtol=RTOL32)  # saturated
    np.testing.assert_allclose(out[1], 199.0, rtol=RTOL32)  # lower side exact
    assert np.all(np.asarray(kl_penalty(jnp.zeros(3), jnp.array([-5.0, 0.0, 5.0]), kind="k3")) >= 0)


def test_unknown_kind():
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(jnp.zeros(2), jnp.zeros(2), kind="k4")


def test_adaptive_controller_hand_computed_and_jitted():
    ctl = adaptive_kl_controller(0.1, target=6.0, horizon=10000)
    state = ctl.init()
    # KL twice the target: error clipped to +0.2.
    np.testing.assert_allclose(ctl.update(state, 12.0, 1000).kl_coef, 0.1 * (1 + 0.2 * 0.1), rtol=RTOL32)
    # KL zero: error clipped to −0.2.
    np.testing.assert_allclose(ctl.update(state, 0.0, 1000).kl_coef, 0.1 * (1 - 0.2 * 0.1), rtol=RTOL32)
    # Inside the clip: error = 6.6/6 − 1 = 0.1.
    np.testing.assert_allclose(ctl.update(state, 6.6, 500).kl_coef, 0.1 * (1 + 0.1 * 0.05), rtol=RTOL32)

    def run(state, kls):
        return jax.lax.scan(lambda s, kl: (ctl.update(s, kl, 100), s.kl_coef), state, kls)

    final, _ = jax.jit(run)(state, jnp.full(5, 12.0))
    np.testing.assert_allclose(final.kl_coef, 0.1 * (1 + 0.2 * 0.01) ** 5, rtol=RTOL32)


def test_fixed_controller_keeps_its_coefficient():
    ctl = fixed_kl_controller(0.05)
    state = jax.jit(ctl.update)(ctl.init(), 100.0, 1000)
    np.testing.assert_allclose(state.kl_coef, 0.05, rtol=RTOL32)
