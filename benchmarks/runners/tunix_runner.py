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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import workloads  # noqa: E402

FRAMEWORK = "tunix"
MODEL_NOTE = ("model: tunix.models.llama3.Llama3 via llama3.params.create_model_from_safe_tensors, fp32, "
              "ModelConfig built from config.json (weight_tying from tie_word_embeddings); Tunix 0.1.7's "
              "Llama3 ignores ModelConfig.rope_theta (apply_rope always uses its default 1e6), so its "
              "logits differ from HF's for these models; the compute is the same")


# --------------------------------------------------------------------------- model


def hf_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def tunix_config(cfg: dict):
    """A tunix llama3 ModelConfig matching an HF LlamaConfig dict."""
    from tunix.models.llama3 import model as llama

    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
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


class StampedBatches:
    """Yields ``n`` copies of one batch; before each yield waits for ``model``'s params and stamps the time.

    The trainer pulls batch i+1 only after dispatching step i; waiting on the
    params (which step i's optimizer update rewrote) makes stamp[i+1] the end
    of step i, so ``diff(stamps)`` are per-step wall times.
    """

    def __init__(self, batch, n: int, model_fn, stamp_after_first: bool = True):
        self.batch, self.n, self.model_fn = batch, n, model_fn
        self.stamp_after_first = stamp_after_first
        self.stamps: list[float] = []

    def __iter__(self):
        for i in range(self.n):
            if i == 0 or self.stamp_after_first:
                block_on(self.model_fn())
                self.stamps.append(time.perf_counter())
            yield self.batch

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def StampOnTrainEnd(stamps: list):
    """A tunix TrainingHooks whose on_train_end waits on the trained model's params and stamps the time."""
    from tunix.sft import hooks

    class _Hooks(hooks.TrainingHooks):
        def on_train_start(self, train_ctx):
            pass

        def on_train_end(self, train_ctx):
            block_on(train_ctx.model)
            stamps.append(time.perf_counter())

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
    import optax
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
            trainer = dpo.DPOTrainer(model=policy, ref_model=ref, optimizer=optax.adamw(workloads.LR),
                                     training_config=config)
            # n + 1 batches: the loop pulls batch n (stamping the end of step n-1), then stops at max_steps.
            data = StampedBatches(batch, n + 1, lambda: trainer.model)
            trainer.train(data)
    d = data.durations()
    assert len(d) == n and trainer.train_steps == n, (len(d), trainer.train_steps)
    losses = trainer.metrics_logger._metrics.get("", {}).get("train", {}).get("loss", [])
    note = ("DPOTrainer.train() on pre-tokenized TrainingInput dicts (no padding, all-ones masks), "
            "reference = second Llama3 copy; step time = interval between the trainer's pulls of "
            "successive batches, each pull first waiting on the policy params (so it includes the "
            "reference forward done in _prepare_inputs and the jitted policy step)")
    if losses:
        note += f"; first logged loss {float(np.asarray(losses[0])):.6f} (ln2={math.log(2):.6f})"
    return d, note


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
    import optax
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
        actor_optimizer=optax.adamw(workloads.LR), eval_every_n_steps=10**9, max_steps=n,
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
    # Stamps: the first batch pull (RLLearner.train() pulls it up front), then the end of every
    # actor update (a TrainingHooks.on_train_end that first waits on the actor params), so each
    # interval is one whole GRPO step: rollout, rewards, reference forward, policy update.
    # prompts as a numpy array (what a grain-batched dataset yields): RLLearner repeats each leaf of
    # the batch G times with jax.tree.map, so a python list of str would be repeated per string.
    data = StampedBatches({"prompts": np.array(prompts)}, n, lambda: cluster.actor_trainer.model,
                          stamp_after_first=False)
    cluster.actor_trainer.with_training_hooks(StampOnTrainEnd(data.stamps))
    learner.train(data)
    d = data.durations()
    lengths = seen.get("lengths", [])
    assert len(d) == n and cluster.actor_trainer.train_steps == n, (len(d), cluster.actor_trainer.train_steps)
    assert len(lengths) == n * s["prompts"] * s["G"], (len(lengths), n)
    assert set(lengths) == {s["new_tokens"]}, f"completion lengths {sorted(set(lengths))}"
    note = (f"GRPOLearner + RLCluster (vanilla rollout, colocated on one CPU mesh, actor shares "
            f"weights with the rollout sampler), tokenizer={tok_kind}, temperature 1 via top_p=1.0 "
            f"(top_p=None means greedy in Tunix), eos_tokens=[-1], kl_loss_mode=low_var_kl; "
            f"step time = interval between ends of successive actor updates (TrainingHooks.on_train_end "
            f"after waiting on the actor params; the first from the first batch pull); "
            f"all {len(lengths)} completions had exactly {s['new_tokens']} tokens (reward fn re-tokenizes "
            f"the completion text); Tunix's vanilla rollout reuses PRNGKey(seed or 0) on every step")
    return d, note


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
        t0 = time.perf_counter()
        out = sampler(input_strings=texts, max_generation_steps=s["new_tokens"],
                      max_prompt_length=s["prompt_len"], temperature=1.0, top_p=1.0, top_k=None,
                      eos_tokens=[-1], seed=seed)
        dt = time.perf_counter() - t0
        assert np.array_equal(np.asarray(out.padded_prompt_tokens), prompt_ids), "prompt changed"
        lens = {len(t) for t in out.tokens}
        assert lens == {s["new_tokens"]}, f"generated lengths {lens}"
        return dt

    d = [once(i) for i in range(s["warmup"] + s["steps"])]
    note = (f"tunix.generate.sampler.Sampler, KV cache {s['prompt_len'] + s['new_tokens']}, "
            f"tokenizer={tok_kind}, temperature 1 via top_p=1.0 (top_p=None is greedy in Tunix), "
            f"eos_tokens=[-1]; wall time of the whole __call__ (tokenize, prefill, decode loop, "
            f"detokenize); every row had exactly {s['new_tokens']} new tokens; Tunix runs new_tokens "
            f"decode forwards after the prefill, one more than needed (the last token is dropped)")
    return d, note


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
        durations, note = RUNNERS[w](args.model_dir, cfg, s)
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
    warm = durations[: s["warmup"]]
    timed = durations[s["warmup"]:]
    med = statistics.median(timed)
    if w == "sample":
        rows = [workloads.row(w, m, FRAMEWORK, "tokens_per_s", s["batch"] * s["new_tokens"] / med, "tokens/s",
                              note=note)]
    else:
        rows = [workloads.row(w, m, FRAMEWORK, "step_time", med, "s", note=note)]
    extra = dict(jax=jax.__version__, threads=len(os.sched_getaffinity(0)), quick=args.quick,
                 timed=[round(x, 6) for x in timed])
    rows[0].update(extra)
    rows.append(workloads.row(w, m, FRAMEWORK, "peak_rss", workloads.peak_rss_mib(), "MiB"))
    rows.append(workloads.row(w, m, FRAMEWORK, "compile_or_first_step", warm[0] if warm else durations[0], "s",
                              note="wall time of the first (warmup) step, compilation included"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
