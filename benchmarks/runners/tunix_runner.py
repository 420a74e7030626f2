"""Benchmark runner for Google's Tunix (``google-tunix``), run in its side venv.

    .bench-venvs/tunix/bin/python benchmarks/runners/tunix_runner.py \
        --model tiny --model-dir /tmp/bench_models/tiny --workload dpo_step \
        --out rows.json [--quick] [--threads N]

Measures Tunix the way a user runs it: the HF safetensors are loaded into
``tunix.models.llama3`` (its ``params.create_model_from_safe_tensors`` with a
``ModelConfig`` built from config.json), and the workloads run through
``tunix.sft.dpo.DPOTrainer``, ``tunix.rl.grpo.GRPOLearner`` on an ``RLCluster``
with the vanilla rollout, and ``tunix.generate.sampler.Sampler``. See
``benchmarks/workloads.py`` for what each workload is, and the ``note`` of each
row for how it was timed and where Tunix forced a deviation.

Two changes make Tunix run the same model and optimizer as the other sides:

- RoPE base: Tunix 0.1.7's Llama3 attention calls ``apply_rope`` without its
  ``rope_theta`` argument, so the default 1e6 is used whatever the config says.
  :func:`patch_rope` rebinds the module's ``apply_rope`` to one whose default is
  the config's base (before anything is traced), and checks it against a NumPy
  RoPE in the Hugging Face convention.
- Clipping: Tunix's trainers have no clipping option; the optimizer is
  ``optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0))``,
  as Tunix's own examples chain it.

Timing: ``warmup`` steps, then ``steps`` steps end to end: the params are waited
on when the timed window opens and once after the trainer returns, so Tunix keeps
its own pipelining (``max_inflight_computations``, 2 by default) inside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import workloads  # noqa: E402

FRAMEWORK = "tunix"
T0 = time.time()  # the launch, unless bench.py passes its own (--t0)
MODEL_NOTE = ("model: tunix.models.llama3.Llama3 via llama3.params.create_model_from_safe_tensors, fp32, "
              "ModelConfig built from config.json (weight_tying from tie_word_embeddings); Tunix 0.1.7's "
              "Llama3 ignores ModelConfig.rope_theta (apply_rope always uses its default 1e6): patched to the "
              "config's base (patch_rope); optimizer clip_by_global_norm(1.0) + adamw(weight_decay=0)")


# --------------------------------------------------------------------------- model


def rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def patch_rope(theta: float, head_dim: int) -> None:
    """Make Tunix's Llama3 rotate with base `theta` (it calls `apply_rope` without one), and check it."""
    import numpy as np
    from tunix.models.llama3 import model as llama

    original = getattr(llama.apply_rope, "unpatched", llama.apply_rope)

    def apply_rope(inputs, positions, head_dim, rope_theta=theta):
        return original(inputs, positions, head_dim, rope_theta=rope_theta)

    apply_rope.unpatched = original
    llama.apply_rope = apply_rope
    # The Hugging Face convention: inv_freq = theta^(-2i/d), x * cos + rotate_half(x) * sin.
    x = np.random.default_rng(0).standard_normal((1, 5, 2, head_dim)).astype(np.float32)  # [B, T, heads, hd]
    pos = np.arange(5, dtype=np.int32)[None]
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.concatenate([pos[0, :, None] * inv] * 2, axis=-1)[None, :, None, :]
    half = head_dim // 2
    want = x * np.cos(ang) + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * np.sin(ang)
    got = np.asarray(llama.apply_rope(x, pos, head_dim))
    if not np.allclose(got, want, atol=1e-4):
        raise RuntimeError(f"patched Tunix RoPE differs from base {theta}: max {np.abs(got - want).max():.2e}")


def optimizer():
    import optax

    return optax.chain(optax.clip_by_global_norm(workloads.GRAD_CLIP),
                       optax.adamw(workloads.LR, weight_decay=workloads.WEIGHT_DECAY))


def hf_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def tunix_config(cfg: dict):
    """A tunix llama3 ModelConfig matching an HF LlamaConfig dict."""
    from tunix.models.llama3 import model as llama

    theta = rope_theta(cfg)
    heads = cfg["num_attention_heads"]
    return llama.ModelConfig(
        num_layers=cfg["num_hidden_layers"],
        vocab_size=cfg["vocab_size"],
        embed_dim=cfg["hidden_size"],
        hidden_dim=cfg["intermediate_size"],
        num_heads=heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        rope_theta=theta,
        norm_eps=cfg["rms_norm_eps"],
        weight_tying=bool(cfg.get("tie_word_embeddings", False)),
    )


def load_model(model_dir: Path, cfg: dict, mesh=None):
    """fp32 Llama3 from the HF safetensors; with ``mesh``, params are placed with the model's shardings.

    Trainers need the params on the mesh from the start: unsharded params come
    back from the first jitted step with NamedShardings, and the step compiles again.
    """
    import jax.numpy as jnp
    from tunix.models.llama3 import params

    patch_rope(rope_theta(cfg), cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    return params.create_model_from_safe_tensors(str(model_dir), tunix_config(cfg), mesh=mesh, dtype=jnp.float32)


class IdTokenizer:
    """Text is the decimal token ids separated by spaces: an exact, lossless tokenizer.

    Used where the model's own HF tokenizer does not round-trip the workload's
    random token ids (SmolLM2's BPE re-merges decoded pieces), so that Tunix's
    string-only sampler/RL APIs still see exactly the workload's tokens.
    """

    def __init__(self, eos: int, pad: int):
        self._eos, self._pad = eos, pad

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None  # Tunix's sampler prepends bos_id() when it is truthy

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return self._pad


def load_tokenizer(model_dir: Path, cfg: dict, probe):
    """(tokenizer, kind): the HF tokenizer if it round-trips ``probe`` ids exactly, else IdTokenizer.

    The HF tokenizer's BOS is switched off: Tunix's sampler prepends ``bos_id()``
    to every prompt, which would make prompts ``prompt_len + 1`` tokens.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.bos_token = None
    ok = all(tok.encode(tok.decode(list(map(int, row))), add_special_tokens=False) == list(map(int, row))
             for row in probe)
    if ok:
        return tok, "hf"
    eos = cfg.get("eos_token_id", 2)
    return IdTokenizer(eos=eos, pad=0), "ids"


def ids_to_text(tok, ids) -> str:
    return tok.decode([int(t) for t in ids])


def text_to_ids(tok, text: str) -> list[int]:
    if isinstance(tok, IdTokenizer):
        return tok.encode(text)
    return tok.encode(text, add_special_tokens=False)


def cpu_mesh():
    import jax

    # Auto axes: jax.make_mesh defaults to Explicit, which Tunix's with_sharding_constraint calls reject.
    return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


# --------------------------------------------------------------------------- timing helpers


def block_on(model):
    import jax
    from flax import nnx

    jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))


class Window:
    """Stamps of one run: the first step's start and end, the timed window's start, the end.

    `stamp(i)` is called at step boundary i (i steps done); it waits on the params only at the
    boundaries that open or close a measured interval (0, 1 and `warmup`), never inside the timed
    window; `finish()` waits once after the trainer returns.
    """

    def __init__(self, warmup: int, steps: int, model_fn):
        self.warmup, self.steps, self.model_fn = warmup, steps, model_fn
        self.at: dict = {}
        self.first_end = None

    def stamp(self, i: int) -> None:
        if i in (0, 1, self.warmup) and i not in self.at:
            block_on(self.model_fn())
            self.at[i] = time.perf_counter()
            if i == 1:
                self.first_end = time.time()

    def finish(self) -> None:
        block_on(self.model_fn())
        self.at["end"] = time.perf_counter()

    def first_step(self) -> float:
        return self.at[1] - self.at[0]

    def step_time(self) -> float:
        return (self.at["end"] - self.at[self.warmup]) / self.steps


class StampedBatches:
    """Yields ``n`` copies of one batch, calling ``on_pull(i)`` before yielding batch i."""

    def __init__(self, batch, n: int, on_pull):
        self.batch, self.n, self.on_pull = batch, n, on_pull

    def __iter__(self):
        for i in range(self.n):
            self.on_pull(i)
            yield self.batch


def StampOnTrainEnd(window: Window, count: list):
    """A tunix TrainingHooks whose on_train_end (one per GRPO step) calls `window.stamp(steps done)`."""
    from tunix.sft import hooks

    class _Hooks(hooks.TrainingHooks):
        def on_train_start(self, train_ctx):
            pass

        def on_train_end(self, train_ctx):
            count.append(1)
            window.stamp(len(count))

        def on_train_step_start(self, train_ctx):
            pass

        def on_train_step_end(self, train_ctx, train_step, train_loss):
            pass

        def on_eval_step_start(self, train_ctx):
            pass

        def on_eval_step_end(self, train_ctx, eval_loss):
            pass

    return _Hooks()


# --------------------------------------------------------------------------- workloads


def run_dpo(model_dir: Path, cfg: dict, s: dict):
    import numpy as np
    from tunix.sft.dpo import dpo_trainer as dpo

    mesh = cpu_mesh()
    policy = load_model(model_dir, cfg, mesh)
    ref = load_model(model_dir, cfg, mesh)
    p, c, r = workloads.dpo_batch(cfg["vocab_size"], s)
    batch = {
        "prompt_ids": p, "prompt_mask": np.ones_like(p),
        "chosen_ids": c, "chosen_mask": np.ones_like(c),
        "rejected_ids": r, "rejected_mask": np.ones_like(r),
    }
    n = s["warmup"] + s["steps"]
    config = dpo.DPOTrainingConfig(
        algorithm="dpo", beta=workloads.DPO_BETA, label_smoothing=0.0,
        eval_every_n_steps=10**9, max_steps=n, pbar_description=None,
    )
    # Under a 1x1 ("fsdp", "tp") mesh, as Tunix's examples do: without one, PeftTrainer skips
    # _shard_optimizer. (`with mesh:` as RLCluster does internally; jax 0.10 deprecates it.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*with mesh.*")
        with mesh:
            trainer = dpo.DPOTrainer(model=policy, ref_model=ref, optimizer=optimizer(), training_config=config)
            # The trainer pulls batch i after dispatching step i - 1: pull i is boundary i. n + 1
            # batches: the loop pulls batch n, then stops at max_steps.
            window = Window(s["warmup"], s["steps"], lambda: trainer.model)
            trainer.train(StampedBatches(batch, n + 1, window.stamp))
            window.finish()
    assert trainer.train_steps == n, trainer.train_steps
    losses = trainer.metrics_logger._metrics.get("", {}).get("train", {}).get("loss", [])
    note = ("DPOTrainer.train() on pre-tokenized TrainingInput dicts (no padding, all-ones masks), "
            "reference = second Llama3 copy; step time = from the pull of the first timed batch (after "
            "waiting on the policy params) to the end of train() (then waiting on them), over the timed "
            "steps: includes the reference forward done in _prepare_inputs and the jitted policy step")
    if losses:
        note += f"; first logged loss {float(np.asarray(losses[0])):.6f} (ln2={math.log(2):.6f})"
    return window, note


def make_reward_fn(tok, counter: dict):
    def reward_fn(prompts, completions, **_):
        out = []
        for text in completions:
            ids = text_to_ids(tok, text)
            counter.setdefault("lengths", []).append(len(ids))
            out.append(workloads.reward(ids))
        return out

    reward_fn.__name__ = "even_fraction"
    return reward_fn


def run_grpo(model_dir: Path, cfg: dict, s: dict):
    import numpy as np
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    prompts_ids = workloads.prompts(cfg["vocab_size"], s["prompts"], s["prompt_len"])
    tok, tok_kind = load_tokenizer(model_dir, cfg, prompts_ids)
    prompts = [ids_to_text(tok, row) for row in prompts_ids]
    mesh = cpu_mesh()
    policy = load_model(model_dir, cfg, mesh)
    ref = load_model(model_dir, cfg, mesh)
    n = s["warmup"] + s["steps"]
    rollout_cfg = base_rollout.RolloutConfig(
        max_tokens_to_generate=s["new_tokens"], max_prompt_length=s["prompt_len"],
        kv_cache_size=s["prompt_len"] + s["new_tokens"], temperature=1.0, top_p=1.0, top_k=None,
        eos_tokens=[-1],  # no real token id: EOS disabled ([] would fall back to the tokenizer's EOS)
    )
    training_cfg = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optimizer(), eval_every_n_steps=10**9, max_steps=n,
        pbar_description=None,
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=policy, reference=ref, tokenizer=tok,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                          rl_cluster_lib.Role.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False,
            training_config=training_cfg, rollout_config=rollout_cfg,
        ),
    )
    algo = grpo_learner.GRPOConfig(
        num_generations=s["G"], num_iterations=1, beta=workloads.GRPO_BETA, epsilon=workloads.GRPO_EPS,
        kl_loss_mode="low_var_kl",  # k3; Tunix's GRPOConfig default is "kl" (k1)
    )
    seen: dict = {}
    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo,
                                       reward_fns=[make_reward_fn(tok, seen)])
    # Boundaries: the first batch pull (RLLearner.train() pulls it up front) is 0, the end of the
    # k-th actor update (TrainingHooks.on_train_end, one per GRPO step: rollout, rewards, reference
    # forward, policy update) is k.
    # prompts as a numpy array (what a grain-batched dataset yields): RLLearner repeats each leaf of
    # the batch G times with jax.tree.map, so a python list of str would be repeated per string.
    window = Window(s["warmup"], s["steps"], lambda: cluster.actor_trainer.model)
    updates: list = []
    cluster.actor_trainer.with_training_hooks(StampOnTrainEnd(window, updates))
    learner.train(StampedBatches({"prompts": np.array(prompts)}, n, lambda i: window.stamp(0) if i == 0 else None))
    window.finish()
    lengths = seen.get("lengths", [])
    assert len(updates) == n and cluster.actor_trainer.train_steps == n, (len(updates),
                                                                          cluster.actor_trainer.train_steps)
    assert len(lengths) == n * s["prompts"] * s["G"], (len(lengths), n)
    assert set(lengths) == {s["new_tokens"]}, f"completion lengths {sorted(set(lengths))}"
    note = (f"GRPOLearner + RLCluster (vanilla rollout, colocated on one CPU mesh, actor shares "
            f"weights with the rollout sampler), tokenizer={tok_kind}, temperature 1 via top_p=1.0 "
            f"(top_p=None means greedy in Tunix), eos_tokens=[-1], kl_loss_mode=low_var_kl; "
            f"step time = from the end of the last warm-up actor update (TrainingHooks.on_train_end, "
            f"waiting on the actor params) to the end of learner.train() (then waiting on them), over "
            f"the timed steps; "
            f"all {len(lengths)} completions had exactly {s['new_tokens']} tokens (reward fn re-tokenizes "
            f"the completion text); Tunix's vanilla rollout reuses PRNGKey(seed or 0) on every step")
    return window, note


def run_sample(model_dir: Path, cfg: dict, s: dict):
    import numpy as np
    from tunix.generate import sampler as sampler_lib

    prompt_ids = workloads.prompts(cfg["vocab_size"], s["batch"], s["prompt_len"])
    tok, tok_kind = load_tokenizer(model_dir, cfg, prompt_ids)
    texts = [ids_to_text(tok, row) for row in prompt_ids]
    model = load_model(model_dir, cfg)
    tc = model.config
    sampler = sampler_lib.Sampler(
        transformer=model, tokenizer=tok,
        cache_config=sampler_lib.CacheConfig(cache_size=s["prompt_len"] + s["new_tokens"],
                                             num_layers=tc.num_layers, num_kv_heads=tc.num_kv_heads,
                                             head_dim=tc.head_dim),
    )

    def once(seed: int):
        out = sampler(input_strings=texts, max_generation_steps=s["new_tokens"],
                      max_prompt_length=s["prompt_len"], temperature=1.0, top_p=1.0, top_k=None,
                      eos_tokens=[-1], seed=seed)
        assert np.array_equal(np.asarray(out.padded_prompt_tokens), prompt_ids), "prompt changed"
        lens = {len(t) for t in out.tokens}
        assert lens == {s["new_tokens"]}, f"generated lengths {lens}"

    window = Window(s["warmup"], s["steps"], lambda: model)
    window.stamp(0)
    for i in range(s["warmup"] + s["steps"]):
        once(i)
        window.stamp(i + 1)
    window.finish()
    note = (f"tunix.generate.sampler.Sampler, KV cache {s['prompt_len'] + s['new_tokens']}, "
            f"tokenizer={tok_kind}, temperature 1 via top_p=1.0 (top_p=None is greedy in Tunix), "
            f"eos_tokens=[-1]; wall time of the whole __call__ (tokenize, prefill, decode loop, "
            f"detokenize); every row had exactly {s['new_tokens']} new tokens; Tunix runs new_tokens "
            f"decode forwards after the prefill, one more than needed (the last token is dropped); "
            f"{s['steps']} calls end to end")
    return window, note


RUNNERS = {"dpo_step": run_dpo, "grpo_step_g4": run_grpo, "grpo_step_g8": run_grpo, "sample": run_sample}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(workloads.WORKLOADS))
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--workload", required=True, choices=sorted(RUNNERS))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--t0", type=float, default=None, help="the launch's time.time() (bench.py passes it)")
    args = ap.parse_args(argv)

    if args.threads:
        cores = sorted(os.sched_getaffinity(0))[: args.threads]
        os.sched_setaffinity(0, cores)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import jax

    s = workloads.spec(args.model, args.workload, args.quick)
    cfg = hf_config(args.model_dir)
    w, m = args.workload, args.model
    try:
        window, note = RUNNERS[w](args.model_dir, cfg, s)
    except Exception as e:  # noqa: BLE001 - report, don't crash the orchestrator
        import traceback

        traceback.print_exc()
        rows = [workloads.row(w, m, FRAMEWORK, "unsupported", math.nan, "",
                              note=f"{type(e).__name__}: {e}"[:2000]),
                workloads.row(w, m, FRAMEWORK, "peak_rss", workloads.peak_rss_mib(), "MiB")]
        args.out.write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows, indent=1))
        return 1

    note = f"{note}; {MODEL_NOTE}"
    step = window.step_time()
    if w == "sample":
        rows = [workloads.row(w, m, FRAMEWORK, "tokens_per_s", s["batch"] * s["new_tokens"] / step, "tok/s",
                              note=note)]
    else:
        rows = [workloads.row(w, m, FRAMEWORK, "step_time", step, "s", note=note)]
    rows[0].update(jax=jax.__version__, threads=len(os.sched_getaffinity(0)), quick=args.quick)
    rows.append(workloads.row(w, m, FRAMEWORK, "first_step", window.first_step(), "s",
                              note="the first step, compilation included"))
    rows.append(workloads.row(w, m, FRAMEWORK, "time_to_first_step", window.first_end - (args.t0 or T0), "s",
                              note="launch to the end of the first step"))
    for k, v in workloads.step_flops(FRAMEWORK, w, cfg, s).items():
        rows.append(workloads.row(w, m, FRAMEWORK, k, v, "FLOP"))
    rows.append(workloads.row(w, m, FRAMEWORK, "peak_rss", workloads.peak_rss_mib(), "MiB"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
