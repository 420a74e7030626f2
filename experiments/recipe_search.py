r"""Recipe search for the built-in comparison's SFT stage and reward model (issue 31).

One process at a time, pinned to one core with one intra-op thread:

    one() { taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" "$@"; }
    one python experiments/recipe_search.py sft --format reversed --lengths mix --rope-theta 100 \
        --steps 300 --lr 2e-3 --warmup 30 --schedule cosine --eval-every 50 --seeds 0,1,2,3,4
    one python experiments/recipe_search.py rm --format reversed --lengths mix --rope-theta 100 \
        --steps 300 --lr 2e-3 --warmup 30 --schedule cosine --seed 1 --rm-steps 100 --rm-lr 1e-4 \
        --rm-schedule cosine --rm-warmup 10 --rm-pool logprob
    one python experiments/recipe_search.py stages --seeds 0,1,2,3,4 --with-rm

`sft` trains the demo's tiny Llama for a fixed number of steps with the given
data format, SFT problem distribution, schedule and model size, and prints the
held-out greedy accuracy curve. `rm` trains that SFT once (cached under
--cache), labels pairs with the verifier on train prompts, trains a
Bradley–Terry reward model (value head on the last token or the mean of the
answer tokens, or the answer's log-likelihood) and measures its pair accuracy
on pairs from held-out prompts. `stages` runs what `make demo` runs
(experiments/comparison_stages.py with experiments/configs/arithmetic.py, `--set
sft.steps=400` to override). One JSON line per run goes to stdout and --log;
the tables are in docs/comparison-recipe.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxalign import data, models, training  # noqa: E402
from jaxalign.algorithms import evaluation, reward_model, sft  # noqa: E402
from jaxalign.algorithms.common import PairStep  # noqa: E402
from jaxalign.algorithms.rollout import SamplingConfig, sample  # noqa: E402
from jaxalign.rewards import exact_match, from_verifier  # noqa: E402
from jaxalign.sampling import Sampler  # noqa: E402
from jaxalign.tasks import arithmetic  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Format:
    """How a problem is written: the prompt and the reference completion."""

    prompt: object  # (a, b) -> str
    answer: object  # (a, b) -> str
    prompt_len: int
    answer_len: int  # digits, without EOS


FORMATS = {
    # The format the demo used before issue 31: "123+45=" -> "861".
    "plain": Format(lambda a, b: f"{a}+{b}=", lambda a, b: str(a + b)[::-1], 8, 4),
    # Zero-padded operands, answer still variable width: "123+045=" -> "861".
    "padded_operands": Format(lambda a, b: f"{a:03d}+{b:03d}=", lambda a, b: str(a + b)[::-1], 8, 4),
    # Zero-padded operands and a fixed 4-digit answer: "123+045=" -> "8610".
    "padded": Format(lambda a, b: f"{a:03d}+{b:03d}=", lambda a, b: f"{a + b:04d}"[::-1], 8, 4),
    # Every number zero-padded and least significant digit first: "123+45=" -> "321+540=" -> "8610",
    # so answer digit i sits at a fixed offset from operand digits i (what relative positions encode).
    "reversed": Format(arithmetic.prompt, arithmetic.answer, 8, 4),
}


def _problems(fmt: Format, rng, n: int, split: str, lengths: str = "task"):
    """Prompts and answers in `fmt` for SFT distributions tried here. "task": a, b uniform in 10-999; "mix":
    `arithmetic.sample_problems(digits="mixed")`, half task, half with every digit 0 w.p. 1/2 (the one kept);
    "zeros": all of them sparse; "uniform": each operand's digit count uniform in 1-3; "half": half task,
    half "uniform"."""
    if lengths in ("task", "mix"):
        p = arithmetic.sample_problems(rng, n, split=split, digits={"task": "task", "mix": "mixed"}[lengths])
        return [fmt.prompt(x, y) for x, y in zip(p.a, p.b)], [fmt.answer(x, y) for x, y in zip(p.a, p.b)]
    a, b = [], []
    while len(a) < n:
        m = 4 * n
        if lengths == "zeros":
            x, y = (rng.integers(0, 10, (2, m, 3)) * (rng.random((2, m, 3)) < 0.5)) @ np.array([1, 10, 100])
        else:
            x, y = (10 ** rng.integers(0, 3, (2, m)) * rng.uniform(1, 10, (2, m))).astype(int)
            if lengths == "half":
                t = rng.integers(10, 1000, (2, m))
                x, y = np.where(np.arange(m) % 2 == 0, t, (x, y))
        keep = arithmetic.is_held_out(x, y) == (split == "test")
        a, b = a + x[keep].tolist(), b + y[keep].tolist()
    return [fmt.prompt(x, y) for x, y in zip(a[:n], b[:n])], [fmt.answer(x, y) for x, y in zip(a[:n], b[:n])]


def _prompt_data(prompts, answers, tok):
    records = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    return data.tokenize_prompts(records, tok, max_length=max(len(p) for p in prompts))


def _model_cfg(args):
    return dict(hidden_size=args.d, intermediate_size=4 * args.d, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=args.d // args.heads,
                max_position_embeddings=32, rope_theta=args.rope_theta)


def run_sft(args, seed: int):
    """Fixed-step SFT; returns (model, params, curve, train seconds)."""
    fmt, tok = FORMATS[args.format], arithmetic.load_tokenizer()
    prompts, answers = _problems(fmt, np.random.default_rng(seed), args.train_problems, "train", args.lengths)
    records = [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)]
    sft_data = data.tokenize_sft(records, tok, max_length=fmt.prompt_len + fmt.answer_len + 1)
    loader = data.Loader(sft_data, batch_size=args.batch, seed=seed)
    model = models.Transformer(models.tiny_config("llama", vocab_size=len(tok), **_model_cfg(args)),
                               rngs=nnx.Rngs(seed))
    opt = training.make_optimizer(training.OptimConfig(lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup,
                                                       total_steps=args.steps, grad_clip_norm=1.0,
                                                       b2=args.b2))
    state, mdef = training.init_train_state(model, opt, seed=seed)
    if args.perturb:  # a stand-in for another CPU's rounding: every weight moved by a relative 1e-6-ish
        state = state._replace(params=jax.tree.map(lambda x: x * (1 + args.perturb), state.params))
    step = training.make_train_step(sft.sft_loss_fn, opt, model_def=mdef, shardings=training.state_shardings(state))
    held_p, held_a = _problems(fmt, np.random.default_rng(1234), args.eval_prompts, "test")
    heldout = _prompt_data(held_p, held_a, tok)
    sampler, reward_fn = Sampler(model), from_verifier(exact_match)
    curve, train_s = [], 0.0
    for i in range(1, args.steps + 1):
        t0 = time.perf_counter()
        state, m = step(state, next(loader))
        jax.block_until_ready(state.params)
        train_s += time.perf_counter() - t0
        if i % args.eval_every == 0 or i == args.steps:
            acc = evaluation.greedy_score(sampler, state.params, heldout, reward_fn, tok,
                                          max_new_tokens=fmt.answer_len + 2)
            curve.append((i, round(float(m["loss"]), 4), round(acc, 3)))
    params = models.copy_tree(state.params)
    return mdef.merge(models.copy_tree(params)), params, curve, train_s


def label(fmt, tok, model, params, prompts, answers, *, samples: int, per_prompt: int, temperature: float, seed: int,
          reference_chosen: bool = False):
    """Verifier-labelled (chosen, rejected) records: up to `per_prompt` distinct pairs per prompt."""
    pd = _prompt_data(prompts, answers, tok)
    sampler, records = Sampler(model), []
    for k, batch in enumerate(evaluation.batches(pd, 512)):
        rollout, _ = sample(sampler, params, batch, n=samples,
                            cfg=SamplingConfig(max_new_tokens=fmt.answer_len + 2, temperature=temperature),
                            eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, rng=jax.random.PRNGKey(seed + k),
                            tokenizer=tok)
        ok = exact_match(rollout.completions, rollout.answers) > 0
        for i in range(len(batch["prompts"])):
            rows = range(i * samples, (i + 1) * samples)
            good = list(dict.fromkeys(rollout.completions[r] for r in rows if ok[r]))
            bad = list(dict.fromkeys(rollout.completions[r] for r in rows if not ok[r] and rollout.completions[r]))
            if reference_chosen and not good:  # the reference answer when no sample is right
                good = [batch["answers"][i]]
            pairs = [(g, b) for b in bad for g in good][:per_prompt]
            records += [{"prompt": batch["prompts"][i], "chosen": g, "rejected": b} for g, b in pairs]
    return records



def run_rm(args):
    fmt, tok = FORMATS[args.format], arithmetic.load_tokenizer()
    cache = os.path.join(args.cache, f"sft-{args.format}-s{args.seed}-{args.steps}-{args.lr}-{args.warmup}-"
                         f"{args.schedule}-{args.batch}-{args.d}x{args.layers}-{args.lengths}-{args.rope_theta}-"
                         f"{args.b2}.pkl")
    if os.path.exists(cache):
        with open(cache, "rb") as f:
            params, curve = pickle.load(f)
        model = models.Transformer(models.tiny_config("llama", vocab_size=len(tok), **_model_cfg(args)),
                                   rngs=nnx.Rngs(args.seed))
        nnx.update(model, _as_state(model, params))
    else:
        model, params, curve, _ = run_sft(args, args.seed)
        os.makedirs(args.cache, exist_ok=True)
        with open(cache, "wb") as f:
            pickle.dump((jax.device_get(params), curve), f)
    t0 = time.perf_counter()
    tp, ta = _problems(fmt, np.random.default_rng(args.seed + 1), args.pair_prompts, "train")
    train_rec = label(fmt, tok, model, params, tp, ta, samples=args.samples, per_prompt=args.per_prompt,
                      temperature=args.temperature, seed=args.seed + 100, reference_chosen=args.reference_chosen)
    hp, ha = _problems(fmt, np.random.default_rng(4321), 2000, "test")
    # Held-out pairs: both answers sampled from the policy at temperature 1, one pair per prompt.
    held_rec = label(fmt, tok, model, params, hp, ha, samples=8, per_prompt=1, temperature=1.0, seed=999)
    label_s = time.perf_counter() - t0
    length = fmt.prompt_len + fmt.answer_len + 3
    train_pairs = data.tokenize_preference(train_rec, tok, max_length=length)
    held_pairs = data.tokenize_preference(held_rec, tok, max_length=length)
    lm = models.clone_model(model)
    nnx.update(lm, _as_state(lm, params))
    if args.rm_fresh:  # a randomly initialised backbone of the same size instead of the SFT one
        lm = models.Transformer(lm.cfg, rngs=nnx.Rngs(args.seed + 5))
    if args.rm_layers:  # the SFT layers, then freshly initialised ones up to rm_layers
        lm = deeper(lm, params, args.rm_layers, seed=args.seed + 5)
    rm = lm if args.rm_pool == "logprob" else models.with_value_head(lm, init="reward", rngs=nnx.Rngs(args.seed))
    opt = training.make_optimizer(training.OptimConfig(lr=args.rm_lr, schedule=args.rm_schedule,
                                                       warmup_steps=args.rm_warmup, total_steps=args.rm_steps))
    state, mdef = training.init_train_state(rm, opt, seed=args.seed)
    loss_fn, score_fn = {"last": (reward_model.reward_loss_fn, reward_model.pair_scores),
                         "mean": (mean_pool_loss, mean_pool_scores),
                         "logprob": (logprob_loss, logprob_scores)}[args.rm_pool]
    step = PairStep(training.make_train_step(loss_fn, opt, model_def=mdef, shardings=training.state_shardings(state)),
                    last=False)
    loader = data.Loader(train_pairs, batch_size=args.rm_batch, seed=args.seed)
    scores = jax.jit(lambda p, b: score_fn(mdef.merge(p), b))

    def pair_acc(pairs):
        right = n = 0
        for b in data.Loader(pairs, batch_size=len(pairs), shuffle=False, num_epochs=1):
            c, r = scores(state.params, b)
            k = len(np.asarray(c))
            right, n = right + int((np.asarray(c) > np.asarray(r)).sum()), n + k
        return right / max(n, 1)

    t0, curve_rm = time.perf_counter(), [(0, round(pair_acc(held_pairs), 3))]
    for i in range(1, args.rm_steps + 1):
        state, m = step(state, next(loader))
        if i % max(args.rm_steps // 4, 1) == 0:
            jax.block_until_ready(state.params)
            curve_rm.append((i, round(pair_acc(held_pairs), 3)))
    rm_s = time.perf_counter() - t0
    return {"sft_final": curve[-1], "train_pairs": len(train_pairs), "heldout_pairs": len(held_pairs),
            "label_s": round(label_s, 1), "rm_s_incl_evals": round(rm_s, 1),
            "train_pair_acc": round(pair_acc(train_pairs), 3), "heldout_pair_acc": curve_rm[-1][1],
            "heldout_curve": curve_rm}


def mean_pool_scores(model, batch):
    """Scores as the mean of the per-token values over the response tokens (not the last token's value)."""
    import jax.numpy as jnp

    cat = lambda k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]])  # noqa: E731
    values = model(cat("tokens"), positions=cat("positions"), attention_mask=cat("attention_mask"))
    m = cat("loss_mask").astype(values.dtype)
    s = (values * m).sum(1) / jnp.maximum(m.sum(1), 1)
    b = batch["chosen_tokens"].shape[0]
    return s[:b], s[b:]


def logprob_scores(model, batch):
    """A generative reward model: the score is the answer's summed log-probability under the LM being trained."""
    from jaxalign.algorithms.common import response_logprobs

    out = []
    for name in ("chosen_", "rejected_"):
        logps, mask = response_logprobs(model, batch, prefix=name)
        out.append((logps * mask).sum(1))
    return out[0], out[1]


def logprob_loss(model, batch, rng):
    from jaxalign.losses import bradley_terry_loss

    del rng
    chosen, rejected = logprob_scores(model, batch)
    return bradley_terry_loss(chosen, rejected, return_parts=True)


def mean_pool_loss(model, batch, rng):
    from jaxalign.losses import bradley_terry_loss

    del rng
    chosen, rejected = mean_pool_scores(model, batch)
    return bradley_terry_loss(chosen, rejected, return_parts=True)


def deeper(model, params, layers: int, *, seed: int):
    """A `layers`-layer copy of `model`: its embeddings, final norm and layers from `params`, the rest random."""
    deep = models.Transformer(dataclasses.replace(model.cfg, num_layers=layers), rngs=nnx.Rngs(seed))
    state = nnx.state(deep, nnx.Param)
    pure = nnx.to_pure_dict(state)
    src = jax.tree.map(np.asarray, params)
    for key in src:
        if key != "layers":
            pure[key] = src[key]
    for i, layer in src["layers"].items():
        pure["layers"][i] = layer
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(deep, state)
    return deep


def _as_state(model, params):
    state = nnx.state(model, nnx.Param)
    return jax.tree.unflatten(jax.tree.structure(state), models.copy_tree(jax.tree.leaves(params)))


def run_stages(args, seed: int) -> dict:
    """The implemented stages (experiments/comparison_stages.py) under experiments/configs/arithmetic.py + `--set`."""
    import ast

    from experiments.configs import arithmetic as arithmetic_config
    from experiments import comparison_stages as comparison

    cfg = arithmetic_config.get_config()
    with cfg.unlocked():
        cfg.seed = seed
        for item in args.set:
            key, value = item.split("=", 1)
            *path, last = key.split(".")
            sec = cfg
            for p in path:
                sec = sec[p]
            sec[last] = ast.literal_eval(value)
    task = comparison.build_task(cfg)
    t0 = time.perf_counter()
    model, params, history = comparison.train_sft(cfg, task)
    out = {"sft_s": round(time.perf_counter() - t0, 1), "sft_accuracy": history[-1]["accuracy"],
           "sft_curve": [(h["step"], round(h["accuracy"], 3)) for h in history]}
    if args.with_rm:
        t0 = time.perf_counter()
        pairs = comparison.label_pairs(cfg, task, model, params)
        out["label_s"], out["pairs"] = round(time.perf_counter() - t0, 1), len(pairs)
        t0 = time.perf_counter()
        _, info = comparison.train_reward_model(cfg, model, params, pairs)
        out["rm_s"], out["reward_model"] = round(time.perf_counter() - t0, 1), info
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("sft", "rm", "stages"))
    ap.add_argument("--format", default="padded", choices=sorted(FORMATS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--schedule", default="constant")
    ap.add_argument("--b2", type=float, default=0.999)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--train-problems", type=int, default=20000)
    ap.add_argument("--eval-prompts", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lengths", default="task", choices=("task", "uniform", "half", "zeros", "mix"))
    ap.add_argument("--perturb", type=float, default=0.0)
    ap.add_argument("--cache", default="/tmp/recipe_search")
    ap.add_argument("--pair-prompts", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--per-prompt", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--reference-chosen", action="store_true")
    ap.add_argument("--rm-steps", type=int, default=100)
    ap.add_argument("--rm-lr", type=float, default=3e-4)
    ap.add_argument("--rm-schedule", default="constant")
    ap.add_argument("--rm-warmup", type=int, default=0)
    ap.add_argument("--rm-batch", type=int, default=64)
    ap.add_argument("--rm-fresh", action="store_true")
    ap.add_argument("--rm-layers", type=int, default=0)
    ap.add_argument("--rm-pool", default="last", choices=("last", "mean", "logprob"))
    ap.add_argument("--with-rm", action="store_true", help="stages: also label pairs and train the reward model")
    ap.add_argument("--set", action="append", default=[], help="stages: a config override, e.g. sft.steps=400")
    ap.add_argument("--log", default="")
    args = ap.parse_args()
    flags = os.environ.get("XLA_FLAGS", "")
    if args.what == "sft":
        for seed in [int(s) for s in args.seeds.split(",")]:
            _, _, curve, train_s = run_sft(args, seed)
            out = {"what": "sft", "seed": seed, "final_acc": curve[-1][2], "train_s": round(train_s, 1),
                   "curve": curve}
            _emit(out, args, flags)
    elif args.what == "stages":
        for seed in [int(s) for s in args.seeds.split(",")]:
            _emit({"what": "stages", "seed": seed, **run_stages(args, seed)}, args, flags)
    else:
        _emit({"what": "rm", "seed": args.seed, **run_rm(args)}, args, flags)


def _emit(out, args, flags):
    out["args"] = {k: v for k, v in vars(args).items() if k not in ("log", "cache")}
    out["xla_flags"] = flags
    line = json.dumps(out)
    print(line, flush=True)
    if args.log:
        with open(args.log, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
