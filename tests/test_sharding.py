"""Mesh, rules table and placement helpers on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.training import OptimConfig, init_train_state, make_optimizer
from tests._toy_model import ToyLM

# ToyLM(vocab=33): 33 rows cannot split over tensor=2, so `vocab` falls back
# to replication there; everything else follows LOGICAL_AXIS_RULES. Specs are
# canonical (no trailing None), as jit reports them.
EXPECTED_TOY_33 = {
    "embed": P(None, "fsdp"),  # (vocab=33 -> replicated, embed)
    "w_in": P("fsdp", "tensor"),  # (embed, mlp)
    "b_in": P("tensor"),  # (mlp,)
    "w_out": P("tensor", "fsdp"),  # (mlp, embed)
    "scale": P(),  # (norm,)
    "unembed": P("fsdp"),  # (embed, vocab=33 -> replicated)
}


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))


def test_mesh_shape_resolution():
    assert shd.resolve_mesh_shape(shd.MeshConfig(), 8) == (8, 1, 1)
    assert shd.resolve_mesh_shape(shd.MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError):
        shd.resolve_mesh_shape(shd.MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError):
        shd.resolve_mesh_shape(shd.MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ValueError):
        shd.resolve_mesh_shape(shd.MeshConfig(data=-1, fsdp=3), 8)


def test_mesh_axes_are_auto(mesh):
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_logical_to_spec_follows_table():
    assert shd.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("batch", None)) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert shd.logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    # A mesh axis may appear once per spec: the second user is replicated.
    assert shd.logical_to_spec(("heads", "kv_heads")) == P("tensor", None)
    assert shd.logical_to_spec(("no_such_axis",)) == P(None)


def test_spec_for_replicates_indivisible_dims(mesh):
    assert shd.spec_for(("heads", "head_dim"), (9, 64), mesh) == P()
    assert shd.spec_for(("heads", "head_dim"), (8, 64), mesh) == P("tensor")
    assert shd.spec_for(("vocab", "embed"), (9, 64), mesh) == P(None, "fsdp")
    with pytest.raises(ValueError):
        shd.spec_for(("embed",), (4, 4), mesh)


def test_param_shardings_match_stored_table(mesh):
    model = ToyLM(vocab=33, rngs=nnx.Rngs(0))
    got = {k: s.spec for k, s in shd.param_shardings(model, mesh).items()}
    assert got == EXPECTED_TOY_33
    axes = shd.param_axes(model)
    assert axes["w_in"] == ("embed", "mlp") and axes["scale"] == ("norm",)


def test_shard_model_places_params_and_keeps_values(mesh):
    ref = ToyLM(vocab=33, rngs=nnx.Rngs(0))
    model = shd.shard_model(ToyLM(vocab=33, rngs=nnx.Rngs(0)), mesh)
    for name, spec in EXPECTED_TOY_33.items():
        arr = getattr(model, name)[...]
        assert arr.sharding == NamedSharding(mesh, spec), name
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(getattr(ref, name)[...]))


def test_create_sharded_model_builds_in_place(mesh):
    ref = ToyLM(vocab=33, rngs=nnx.Rngs(0))
    model = shd.create_sharded_model(lambda: ToyLM(vocab=33, rngs=nnx.Rngs(0)), mesh)
    for name, spec in EXPECTED_TOY_33.items():
        arr = getattr(model, name)[...]
        assert arr.sharding.spec == spec, name
        np.testing.assert_allclose(np.asarray(arr), np.asarray(getattr(ref, name)[...]), atol=1e-7)


def test_shard_batch(mesh):
    batch = {"tokens": np.arange(8 * 5).reshape(8, 5), "n": np.float32(3.0)}
    out = shd.shard_batch(batch, mesh)
    assert out["tokens"].sharding.spec == P(("data", "fsdp"))
    # 4 batch shards x 2 tensor replicas: each device holds 2 rows.
    assert {s.data.shape for s in out["tokens"].addressable_shards} == {(2, 5)}
    assert out["n"].sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
    # jax arrays are resharded (or passed through when already placed).
    again = shd.shard_batch({"tokens": out["tokens"], "dev0": jnp.ones((8, 2))}, mesh)
    assert again["tokens"] is out["tokens"]
    assert again["dev0"].sharding == out["tokens"].sharding
    with pytest.raises(ValueError, match="does not split"):
        shd.shard_batch({"x": np.zeros((6, 2))}, mesh)
    assert shd.process_batch_slice(8, mesh) == slice(0, 8)


def test_optimizer_state_shardings(mesh):
    tx = make_optimizer(OptimConfig(weight_decay=0.1, grad_clip_norm=1.0))
    state, _ = init_train_state(ToyLM(vocab=33, rngs=nnx.Rngs(0)), tx, mesh=mesh)
    for x in jax.tree.leaves(state):
        assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        if x.ndim == 0:
            assert x.sharding.spec == P()
    count = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
    assert count and all(c.sharding.spec == P() for _, c in count)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert {k: v.sharding.spec for k, v in mu.items()} == EXPECTED_TOY_33
    assert state.rng.sharding.spec == P() and state.step.sharding.spec == P()


def test_opt_state_shardings_on_abstract_state(mesh):
    params = {"a": jnp.zeros((4, 8)), "b": jnp.zeros((8,))}
    p_sh = {"a": NamedSharding(mesh, P("fsdp", "tensor")), "b": NamedSharding(mesh, P("tensor"))}
    abstract = jax.eval_shape(optax.adam(1e-3).init, params)
    sh = shd.opt_state_shardings(abstract, p_sh, mesh)
    assert sh[0].mu == p_sh and sh[0].nu == p_sh
    assert sh[0].count.spec == P()


def test_maybe_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    env = {"JAXALIGN_COORDINATOR": "10.0.0.1:1234", "JAXALIGN_NUM_PROCESSES": "4",
           "JAXALIGN_PROCESS_ID": "3"}
    assert shd.maybe_initialize_distributed(env, tpu_present=False)
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert shd.maybe_initialize_distributed({}, tpu_present=True)
    assert calls[-1] == {}  # on a TPU pod JAX reads the topology itself
    assert not shd.maybe_initialize_distributed({}, tpu_present=False)
    assert len(calls) == 2


# The real decoder (tiny Llama, 4 query heads, 1 KV head): the single KV head
# cannot split over tensor=2, so k/v fall back to fsdp only. The layers are
# stacked: a leading `layers` axis, never split (each device holds its share of every layer).
EXPECTED_LLAMA_LAYERS = {
    "attn": {
        "q": P(None, "fsdp", "tensor"),  # (layers, embed, heads, head_dim)
        "k": P(None, "fsdp"),  # (layers, embed, kv_heads=1 -> replicated, head_dim)
        "v": P(None, "fsdp"),
        "o": P(None, "tensor", None, "fsdp"),  # (layers, heads, head_dim, embed)
    },
    "attn_norm": {"scale": P()},
    "mlp": {"gate": P(None, "fsdp", "tensor"), "up": P(None, "fsdp", "tensor"), "down": P(None, "tensor", "fsdp")},
    "mlp_norm": {"scale": P()},
}
EXPECTED_LLAMA_TOP = {"embed": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"),
                      "final_norm": {"scale": P()}}


def tiny_llama_config():
    from jaxalign.models import ModelConfig

    return ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=1, head_dim=8,
                       max_position_embeddings=64)


def test_real_transformer_shardings_match_stored_table(mesh):
    from jaxalign.models import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(tiny_llama_config(), rngs=nnx.Rngs(0)))
    specs = jax.tree.map(lambda s: s.spec, shd.param_shardings(abstract, mesh))
    assert {k: specs[k] for k in EXPECTED_LLAMA_TOP} == EXPECTED_LLAMA_TOP
    assert set(specs) == set(EXPECTED_LLAMA_TOP) | {"layers"}
    assert specs["layers"] == EXPECTED_LLAMA_LAYERS
