"""AdamW (`make_optimizer`): optax's arithmetic, the one-pass guarded update and its bounds, the decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.training import OptimConfig, make_optimizer, make_schedule
from jaxalign.training.optim import LIMIT, decay_mask, global_norm

SHAPES = {"embed": (6, 4), "bias": (4,), "layers": {"q": (2, 4, 3), "scale": (2, 4)}}


def tree(seed: int, scale: float = 1.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s), dtype), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def run(tx, params, grads_list):
    """Runs `tx.apply` over the gradients: [(params, state, finite)] after each."""
    apply = jax.jit(tx.apply)
    state, out = tx.init(params), []
    for g in grads_list:
        params, state, finite = apply(g, global_norm(g), jnp.bool_(True), params, state)
        out.append((params, state, bool(finite)))
    return out


def test_decay_mask_skips_vectors_and_stacked_vectors():
    mask = decay_mask(tree(0))
    assert mask == {"embed": True, "bias": False, "layers": {"q": True, "scale": False}}


def test_apply_matches_optax_clip_then_adamw():
    cfg = OptimConfig(lr=0.05, schedule="cosine", warmup_steps=1, total_steps=6, weight_decay=0.1,
                      grad_clip_norm=1.0)
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(make_schedule(0.05, "cosine", 1, 6), weight_decay=0.1, mask=decay_mask))
    params = tree(0)
    grads = [tree(1, 3.0), tree(2, 0.01), tree(3, 1.0), tree(4, 0.2)]  # norms above and below the clip
    ours = run(make_optimizer(cfg), params, grads)
    p, s = params, ref.init(params)
    for g, (ours_p, ours_s, finite) in zip(grads, ours):
        u, s = ref.update(g, s, p)
        p = optax.apply_updates(p, u)
        assert finite
        for a, b in zip(jax.tree.leaves(ours_p), jax.tree.leaves(p)):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
        for a, b in zip(jax.tree.leaves((ours_s.mu, ours_s.nu)), jax.tree.leaves((s[1][0].mu, s[1][0].nu))):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-12)
    assert int(ours[-1][1].count) == len(grads)
    assert float(ours[-1][1].learning_rate) == pytest.approx(float(make_schedule(0.05, "cosine", 1, 6)(3)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bounds_hold_and_keep_the_one_pass_update(dtype):
    tx = make_optimizer(OptimConfig(lr=0.3, schedule="constant", weight_decay=0.1, grad_clip_norm=None))
    out = run(tx, tree(0, dtype=dtype), [tree(10 + i, 10.0, dtype) for i in range(12)])
    for p, s, finite in out:
        assert finite and s.mu["embed"].dtype == jnp.float32
        actual = [max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(t))
                  for t in (p, s.mu, s.nu)]
        assert all(a <= float(b) for a, b in zip(actual, s.bounds)), (actual, s.bounds)
    assert float(jnp.max(out[-1][1].bounds)) < LIMIT  # still decided from the bounds, no check pass


def test_loose_bounds_check_the_candidate_and_reset():
    tx = make_optimizer(OptimConfig(lr=0.01, schedule="constant", grad_clip_norm=1.0))
    params, g = tree(0), tree(1)
    fast = run(tx, params, [g])[0]
    state = tx.init(params)._replace(bounds=jnp.full((3,), jnp.inf))  # nothing provable: the exact check runs
    p, s, finite = jax.jit(tx.apply)(g, global_norm(g), jnp.bool_(True), params, state)
    assert bool(finite)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves((p, s.mu, s.nu)),
                                                    jax.tree.leaves((fast[0], fast[1].mu, fast[1].nu))))
    largest = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves((p, s.mu, s.nu)))
    assert largest <= float(s.bounds[0]) <= 2 * largest + 1e-30  # reset to the next power of two, not inf


def test_overflowing_update_keeps_the_state():
    # lr 3e38 times Adam's first direction (|r| <= 1) stays finite; the second step overflows float32.
    tx = make_optimizer(OptimConfig(lr=3e38, schedule="constant", grad_clip_norm=None))
    g = jax.tree.map(jnp.ones_like, tree(0))
    (p1, s1, f1), (p2, s2, f2) = run(tx, tree(0), [g, g])
    assert f1 and all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p1))
    assert float(jnp.max(jnp.abs(p1["embed"]))) > 1e38  # the first, finite update was taken
    assert not f2
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))))


def test_non_finite_inputs_keep_the_state():
    tx = make_optimizer(OptimConfig(lr=0.01, schedule="constant"))
    params, g = tree(0), tree(1)
    state = tx.init(params)
    p, s, finite = jax.jit(tx.apply)(g, global_norm(g), jnp.bool_(False), params, state)
    assert not bool(finite)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((params, state))))
