"""experiments/plan.py and plan_programs.py: a small model's DPO, GRPO and PPO runs compiled ahead of time for a 4-chip TPU v5e.

libtpu (in the test extras) compiles for the abstract topology on this CPU machine; the memory numbers
are checked against bytes per chip computed here from the model's shapes and the mesh.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments import plan as plan_mod
from experiments.plan_programs import read_config_json
from experiments.configs import dpo_jsonl, grpo_gsm8k, ppo_arithmetic
from experiments.wiring import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Wider than the suite's usual tiny models on purpose: TPU arrays are stored in (8, 128) tiles, so with
# every chip's shard a whole number of tiles XLA's byte counts equal those computed here from shapes.
# Nothing runs; only the compile's cost grows with the graph, not with these sizes.
D, F, L, H, KV, DH, V = 512, 512, 2, 8, 8, 128, 512
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": D,
          "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
          "head_dim": DH, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "hidden_act": "silu"}
TOPOLOGY, CHIPS = "v5e:2x2", 4
SLACK = 64 * 1024  # small arrays (batch, norm scales, metrics) padded to whole tiles
SCHEMA = {"fits": bool, "topology": str, "chips": int, "hbm_per_chip_bytes": int, "peak_bytes_per_chip": int,
          "programs": list, "suggested_overrides": dict}
PROGRAM_SCHEMA = {"name": str, "argument_bytes": int, "temp_bytes": int, "output_bytes": int, "flops": float,
                  "estimated_s": float, "compile_s": float}


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    for name, arch in (("policy", "LlamaForCausalLM"), ("reward", "LlamaForSequenceClassification")):
        os.makedirs(root / name)
        (root / name / "config.json").write_text(json.dumps({**CONFIG, "architectures": [arch], "num_labels": 1}))
    return root


def fsdp(config):
    """Every chip on the fsdp axis: the matrices' `embed` dim splits 4 ways, norms stay whole."""
    config.mesh.fsdp, config.mesh.data = -1, 1
    return config


def lm_bytes_per_chip(itemsize: int = 4, lm_head: bool = True) -> int:
    """The float32 parameters one chip holds: D-sided matrices / 4 chips, norm scales replicated."""
    matrices = V * D * (2 if lm_head else 1) + L * (D * H * DH + 2 * D * KV * DH + H * DH * D + 3 * D * F)
    # q, k, v split on their D rows; o [H, Dh, D] on D; the MLP on D; embed and head on D.
    norms = (2 * L + 1) * D
    return (matrices // CHIPS + norms) * itemsize


def check_schema(plan: dict):
    for key, kind in SCHEMA.items():
        assert isinstance(plan[key], kind), key
    assert plan["topology"] == TOPOLOGY and plan["chips"] == CHIPS
    assert plan["hbm_per_chip_bytes"] == 16 * 2**30
    for program in plan["programs"]:
        for key, kind in PROGRAM_SCHEMA.items():
            assert isinstance(program[key], kind), (program["name"], key)
        assert program["argument_bytes"] > 0 and program["output_bytes"] > 0 and program["flops"] > 0
        assert program["estimated_s"] > 0 and program["compile_s"] > 0 and not program["error"]
        assert plan["peak_bytes_per_chip"] >= program["peak_bytes"] >= program["argument_bytes"]
    json.dumps(plan)  # serialisable as it is


def by_name(plan: dict) -> dict:
    return {p["name"]: p for p in plan["programs"]}


@pytest.fixture(scope="module")
def dpo_fit(dirs):
    config = fsdp(dpo_jsonl.get_config())
    config.data.batch_size, config.data.max_length = 8, 32
    return plan_mod.plan(config, str(dirs / "policy"), TOPOLOGY, fit=True, log=quiet)


def test_dpo_plan_memory_matches_shapes(dpo_fit):
    check_schema(dpo_fit)
    params = lm_bytes_per_chip()
    resident = dpo_fit["resident_bytes"]
    assert resident["params"] == params
    # AdamW's two moments follow the params; the rest are a few replicated scalars.
    assert 2 * params <= resident["optimizer_state"] <= 2 * params + 1024
    programs = by_name(dpo_fit)
    # The small step runs as two programs; the gradient's arguments are the state and the batch
    # (13 small int32 arrays, at most a few tiles each), its output the float32 gradient (+ metrics).
    state = resident["params"] + resident["optimizer_state"]
    assert state <= programs["train_step.gradient"]["argument_bytes"] <= state + SLACK
    assert params <= programs["train_step.gradient"]["output_bytes"] <= params + SLACK
    assert set(programs) == {"train_step.gradient", "train_step.update", "reference_logprobs"}
    # A precomputed reference is not resident: its program holds the params beside the train state.
    assert "reference" not in resident
    ref = programs["reference_logprobs"]
    assert params <= ref["argument_bytes"] <= params + SLACK
    # The DPO step (forward + backward) costs more than the reference's forward alone.
    assert programs["train_step.gradient"]["flops"] > 2 * ref["flops"]


def test_fit_search_reports_overrides(dpo_fit):
    assert dpo_fit["fits"]
    # The fastest setting fits at once: no remat, one micro-batch; nothing else is tried.
    assert dpo_fit["fit_search"] == [{"model.remat": "none", "train.micro_batches": 1, "fits": True,
                                      "peak_bytes_per_chip": dpo_fit["peak_bytes_per_chip"],
                                      "step_estimated_s": dpo_fit["step_estimated_s"]}]
    assert dpo_fit["suggested_overrides"] == {"model.remat": "none", "train.micro_batches": 1}
    assert "--config.model.remat=none --config.train.micro_batches=1" in plan_mod.table(dpo_fit)


R = 8  # LoRA rank of the LoRA / QLoRA plans


def adapter_bytes_per_chip() -> int:
    """The float32 adapters of all 7 targets on one chip: A [L, in..., R], B [L, R, out...]; a matrix
    with a D-sized axis splits it 4 ways over fsdp (as its weight does), the others are whole."""
    split = L * R * (5 * D + 2 * D)  # A of q, k, v, gate, up (D in); B of o, down (D out)
    whole = L * R * (H * DH + 2 * KV * DH + 2 * F) + L * R * (H * DH + F)  # B of q, k, v, gate, up; A of o, down
    return (split // CHIPS + whole) * 4


@pytest.fixture(scope="module")
def lora_plans(dirs):
    """LoRA and QLoRA (int8) DPO plans, the reference computed in the step from the base (adapters off)."""
    plans = {}
    for quantize in ("none", "int8"):
        config = fsdp(dpo_jsonl.get_config())
        config.data.batch_size, config.data.max_length = 8, 32
        config.algorithm.precompute_reference = False
        config.model.lora.update(rank=R, quantize=quantize)
        plans[quantize] = plan_mod.plan(config, str(dirs / "policy"), TOPOLOGY, log=quiet)
    return plans


def test_lora_plan_trains_adapters_only_with_no_reference_copy(lora_plans, dpo_fit):
    plan = lora_plans["none"]
    check_schema(plan)
    resident, adapters = plan["resident_bytes"], adapter_bytes_per_chip()
    # The frozen base takes no optimizer memory: AdamW's two moments cover the adapters alone.
    assert 2 * adapters <= resident["optimizer_state"] <= 2 * adapters + 1024
    assert resident["params"] == lm_bytes_per_chip() + adapters
    # The reference is the base with adapters off, run inside the step: no copy, no separate program.
    assert set(resident) == {"params", "optimizer_state"}
    assert set(by_name(plan)) == {"train_step.gradient", "train_step.update"}
    # The step's gradient is the adapters' (+ metrics), not the model's.
    assert adapters <= by_name(plan)["train_step.gradient"]["output_bytes"] <= adapters + SLACK
    # The step runs the reference forward besides the policy's forward and backward.
    full_step = by_name(dpo_fit)["train_step.gradient"]["flops"]
    assert by_name(plan)["train_step.gradient"]["flops"] == pytest.approx(full_step * 4 / 3)


def test_qlora_int8_base_is_smaller(lora_plans, dpo_fit):
    plan = lora_plans["int8"]
    check_schema(plan)
    full, lora_only = dpo_fit["resident_bytes"]["params"], lora_plans["none"]["resident_bytes"]["params"]
    assert plan["resident_bytes"]["params"] < full < lora_only
    assert plan["resident_bytes"]["optimizer_state"] == lora_plans["none"]["resident_bytes"]["optimizer_state"]
    assert set(plan["resident_bytes"]) == {"params", "optimizer_state"}


def rl_config(module, dirs, **algorithm):
    config = fsdp(module.get_config())
    config.model.path = str(dirs / "policy")
    config.algorithm.update(dict(prompts_per_step=4, group_size=2, **algorithm))
    config.task.max_prompt_length, config.sampling.max_new_tokens = 8, 8
    return config


def test_grpo_plan_has_the_sampler(dirs):
    plan = plan_mod.plan(rl_config(grpo_gsm8k, dirs), str(dirs / "policy"), TOPOLOGY, log=quiet)
    check_schema(plan)
    programs = by_name(plan)
    assert set(programs) == {"train_step.gradient", "train_step.update", "sampler.prefill", "sampler.decode",
                             "logprobs (old policy, reference)"}  # GRPO's KL term: beta 0.04
    assert programs["sampler.decode"]["runs"] == 8 - 1
    assert plan["resident_bytes"]["reference"] == lm_bytes_per_chip(itemsize=2)  # the gsm8k config's bfloat16
    # The decode step's cache: 2 x [L, 8 rows, KV, 16 slots, Dh] bfloat16 over 4 chips (+ valid, next_pos).
    cache = 2 * L * 8 * KV * 16 * DH * 2 // CHIPS
    assert cache <= programs["sampler.decode"]["output_bytes"] <= cache + SLACK
    assert plan["step_estimated_s"] == pytest.approx(sum(p["estimated_s"] * p["runs"] for p in plan["programs"]))


def test_ppo_plan_has_critic_and_reward_model(dirs):
    config = rl_config(ppo_arithmetic, dirs)
    config.reward.reward_model = str(dirs / "reward")
    plan = plan_mod.plan(config, str(dirs / "policy"), TOPOLOGY, log=quiet)
    check_schema(plan)
    programs = by_name(plan)
    assert {"critic.values", "reward_model.scores", "logprobs (old policy, reference)"} <= set(programs)
    assert programs["logprobs (old policy, reference)"]["runs"] == 2
    resident = plan["resident_bytes"]
    assert resident["reference"] == lm_bytes_per_chip()
    # The reward model: the backbone without an LM head, plus a [D, 1] head replicated (its `value` dim).
    assert resident["reward_model"] == lm_bytes_per_chip(lm_head=False) + D // CHIPS * 4
    # The train state holds the actor and the critic: a copy of the actor (LM head included, unused) + a head.
    assert resident["params"] == 2 * lm_bytes_per_chip() + D // CHIPS * 4


def test_bad_inputs_fail_in_one_line(dirs, tmp_path):
    with pytest.raises(ConfigError, match="--topology 'v9z:2x2'"):
        plan_mod.topology("v9z:2x2")
    with pytest.raises(ConfigError, match="no config.json"):
        read_config_json(str(tmp_path))
    config = fsdp(dpo_jsonl.get_config())
    config.data.batch_size = 2
    with pytest.raises(ConfigError, match="config.data.batch_size: batches of 2 rows do not split over data x "
                                          "fsdp = 4 devices"):
        plan_mod.plan(config, str(dirs / "policy"), TOPOLOGY, log=quiet)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "plan.py"), "--config",
                          os.path.join(ROOT, "experiments", "configs", "dpo_jsonl.py"), "--model", str(tmp_path),
                          "--topology", TOPOLOGY], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"error: --model {str(tmp_path)!r}: no config.json there (a Hugging "
                                               "Face model directory, or experiments/configs/shapes/<name>)"]


def test_every_shape_config_is_supported():
    from jaxalign import models

    shapes = os.path.join(ROOT, "experiments", "configs", "shapes")
    names = sorted(os.listdir(shapes))
    assert "llama-3.1-8b" in names and "llama-3.1-70b" in names
    for name in names:
        cfg = models.config_from_hf(read_config_json(os.path.join(shapes, name)))
        assert cfg.num_layers > 0 and math.prod((cfg.hidden_size, cfg.vocab_size)) > 0
