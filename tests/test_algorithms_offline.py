"""The DPO family's glue on a tiny model: every loss type, and the reference handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import data, models, training
from jaxalign.algorithms import dpo
from jaxalign.algorithms.common import PairStep, pair_options
from jaxalign.tasks import arithmetic


@pytest.fixture(scope="module")
def setup():
    tok = arithmetic.load_tokenizer()
    records = [{"prompt": f"{a}+{a}=", "chosen": arithmetic.answer(a, a), "rejected": arithmetic.answer(a, a + 1)}
               for a in range(10, 26)]
    pairs = data.tokenize_preference(records, tok, max_length=14)
    model = models.Transformer(models.tiny_config("llama", vocab_size=len(tok)), rngs=nnx.Rngs(0))
    batch = data.Loader(pairs, batch_size=8, shuffle=False).batch_at(0, 0)
    return pairs, model, batch


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo"])
def test_every_loss_type_gives_a_finite_loss_and_gradient(setup, loss_type):
    pairs, model, batch = setup
    cfg = dpo.DPOConfig(loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    if cfg.needs_reference:
        batch = dpo.attach_reference(batch, ref_fn=dpo.make_reference_fn(model))
    loss_fn = dpo.make_dpo_loss_fn(cfg)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    grads = nnx.grad(lambda m: (lambda p: p[0] / p[1])(loss_fn(m, jbatch, None)[0]))(model)
    (num, den), metrics = loss_fn(model, jbatch, None)
    assert np.isfinite(float(num / den)) and float(den) == 8
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]
    assert all(np.isfinite(norms)) and max(norms) > 0


def test_policy_equal_to_reference_gives_log_two(setup):
    _, model, batch = setup
    batch = dpo.attach_reference(batch, ref_fn=dpo.make_reference_fn(model))
    (num, den), metrics = dpo.make_dpo_loss_fn(dpo.DPOConfig())(model, batch, None)
    assert float(num / den) == pytest.approx(np.log(2), abs=1e-6)


def test_precomputed_reference_covers_every_pair_and_equals_the_live_one(setup):
    pairs, model, batch = setup
    ref_fn = dpo.make_reference_fn(model)
    table = dpo.precompute_reference(ref_fn, pairs, batch_size=6)  # 16 pairs: the last batch wraps
    assert sorted(table) == sorted(pairs.index.tolist())
    live = dpo.attach_reference(batch, ref_fn=ref_fn)
    stored = dpo.attach_reference(batch, table=table)
    np.testing.assert_allclose(stored["ref_chosen_logps"], np.asarray(live["ref_chosen_logps"]), atol=1e-5)
    np.testing.assert_allclose(stored["ref_rejected_logps"], np.asarray(live["ref_rejected_logps"]), atol=1e-5)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type 'kto'"):
        dpo.DPOConfig(loss_type="kto")


def test_scoring_the_responses_only_gives_the_full_width_loss_and_gradient(setup):
    _, model, batch = setup
    full, options = pair_options(batch)
    width, length = options["last"], batch["chosen_tokens"].shape[1]
    assert width < length - 1  # the prompt columns are really skipped
    ref_fn = dpo.make_reference_fn(model)  # reads the batcher's score_width itself
    for got, want in zip(ref_fn(batch), ref_fn(full)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    full = dpo.attach_reference(full, ref_fn=ref_fn)
    full["ref_chosen_logps"] = full["ref_chosen_logps"] + 0.3  # a policy away from its reference
    loss_fn = dpo.make_dpo_loss_fn(dpo.DPOConfig(rpo_alpha=0.5))

    def value_and_grad(**opts):
        loss = lambda m: (lambda p: p[0] / p[1])(loss_fn(m, full, None, **opts)[0])
        return float(loss(model)), jax.tree.leaves(nnx.state(nnx.grad(loss)(model), nnx.Param))

    (lw, gw), (lf, gf) = value_and_grad(last=width), value_and_grad()
    assert lw == pytest.approx(lf, rel=1e-6)
    for a, b in zip(gw, gf):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_scored_width_is_an_explicit_option_of_the_step_never_an_int_in_the_batch(setup):
    _, model, batch = setup
    batch = dpo.attach_reference(batch, ref_fn=dpo.make_reference_fn(model))
    opt = training.make_optimizer(training.OptimConfig(lr=1e-3, schedule="constant"))

    def fresh_step():
        state, mdef = training.init_train_state(models.clone_model(model), opt)
        return state, training.make_train_step(dpo.make_dpo_loss_fn(dpo.DPOConfig()), opt, model_def=mdef,
                                               shardings=training.state_shardings(state))

    state, step = fresh_step()
    with pytest.raises(TypeError, match=r"batch\['score_width'\] is the Python int .* step\(state, batch, last=N\)"):
        step(state, batch)
    arrays, options = pair_options(batch)
    _, explicit = step(state, arrays, **options)
    state, step = fresh_step()
    _, paired = PairStep(step)(state, batch)
    assert float(paired["loss"]) == float(explicit["loss"])
    state, step = fresh_step()
    _, full = step(state, arrays)  # every column scored: the same loss, another program
    assert float(full["loss"]) == pytest.approx(float(explicit["loss"]), rel=1e-6)
