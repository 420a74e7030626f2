"""TRL (Hugging Face ``trl`` on torch, CPU) runner for the shared benchmark workloads.

Runs in the side venv ``.bench-venvs/trl`` (pins: ``benchmarks/envs/trl-requirements.txt``):

    .bench-venvs/trl/bin/python benchmarks/runners/trl_runner.py --model tiny \
        --model-dir /tmp/bench_models/tiny --workload dpo_step --out rows.json [--quick] [--threads N]

Measures TRL the way a user runs it: ``DPOTrainer`` / ``GRPOTrainer`` with their configs, and plain
``model.generate`` (what TRL's non-vLLM path calls) for ``sample``. See ``benchmarks/workloads.py`` for what each
workload does. A ``TrainerCallback`` stamps ``on_step_begin`` and ``on_step_end``: ``step_time`` is the wall time
from the first timed step's begin to the last step's end over ``steps`` (end to end, as every runner times it;
eager torch on CPU is synchronous, so no sync is added), and ``step_time_median`` the median of the per-step
intervals.

Two places feed token ids past TRL's text tokenisation, so that every framework sees the same ids and lengths
(reported in each row's ``note``):

- DPO: TRL 1.16 only takes text and always appends EOS to chosen/rejected (+1 token each). The trainer is
  built on the text dataset (TRL's own preprocessing runs and is checked), then its ``train_dataset`` is
  replaced by the exact ``prompt_ids``/``chosen_ids``/``rejected_ids`` columns its collator consumes.
- GRPO: prompts are plain text (not conversational). Where the text does not tokenize back to the exact
  workload ids (smollm2's BPE), ``_tokenize_prompts`` of a thin subclass maps each prompt text to its ids.

TRL's defaults are kept, the optimizer included: ``optim`` is left unset, which transformers 5.24 resolves to
``adamw_torch_fused`` with torch >= 2.8 (``TrainingArguments.default_optim``; asserted, and the optimizer's
``fused`` flag is in the note), with ``max_grad_norm=1.0`` and ``weight_decay=0.0``. Changed, so that every side
runs the same workload: ``bf16=True`` and ``gradient_checkpointing=True`` (TRL 1.16's config defaults) are turned
off (fp32, no remat, like every other side); the learning rate is the workloads' constant 1e-6 (no decay).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import workloads  # noqa: E402

FRAMEWORK = "trl"
T0 = time.time()  # the launch, unless bench.py passes its own (--t0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=sorted(workloads.WORKLOADS))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--workload", required=True, choices=["dpo_step", "grpo_step_g4", "grpo_step_g8", "sample"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, pinned to the first N allowed cores")
    ap.add_argument("--t0", type=float, default=None, help="the launch's time.time() (bench.py passes it)")
    return ap.parse_args(argv)


def set_threads(n: int | None) -> int:
    """Pin to the first ``n`` allowed cores and set the thread env vars; must run before torch is imported."""
    cores = sorted(os.sched_getaffinity(0))
    if n is not None:
        if n < 1:
            raise SystemExit("--threads must be >= 1")
        cores = cores[:n]
        os.sched_setaffinity(0, cores)
    n = len(cores)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


def versions(torch) -> str:
    import accelerate
    import transformers
    import trl

    return (f"trl {trl.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}")


def make_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """`begins`, `ends`: perf_counter stamps of each optimizer step; `first_end`: time.time() of the first end."""

        def __init__(self):
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.first_end = None
            self.optimizer = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.ends.append(time.perf_counter())
            if self.first_end is None:
                self.first_end = time.time()
                self.optimizer = optimizer

    return StepTimer()


def optimizer_note(timer, args) -> str:
    """Checks that TRL ran its default fused AdamW with its default clipping; says so."""
    opt = getattr(timer.optimizer, "optimizer", timer.optimizer)  # under accelerate's wrapper
    fused = bool(opt is not None and opt.defaults.get("fused"))
    assert str(args.optim.value if hasattr(args.optim, "value") else args.optim) == "adamw_torch_fused", args.optim
    assert fused, f"the optimizer is not fused: {type(opt).__name__} {getattr(opt, 'defaults', None)}"
    assert args.max_grad_norm == workloads.GRAD_CLIP and args.weight_decay == workloads.WEIGHT_DECAY
    return (f"optimizer: TRL's default optim={args.optim.value if hasattr(args.optim, 'value') else args.optim} "
            f"({type(opt).__name__}, fused=True), max_grad_norm {args.max_grad_norm}, weight_decay {args.weight_decay}")


def common_args(s: dict, out_dir: str, threads: int) -> dict:
    """TrainingArguments shared by the DPO and GRPO configs: CPU, fp32, no eval/save/logging, constant lr."""
    return dict(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=0,
        max_steps=s["warmup"] + s["steps"], gradient_accumulation_steps=1,
        learning_rate=workloads.LR, lr_scheduler_type="constant", warmup_steps=0,
        report_to="none", eval_strategy="no", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        # TRL 1.16 configs default to gradient_checkpointing=True; the workloads are plain (no remat) steps
        activation_checkpointing=False,
    )


def load_model(model_dir: str, torch):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def ids_to_text(tok, ids) -> str:
    return tok.decode([int(t) for t in ids])


# ----------------------------------------------------------------------------------------------------- DPO


def run_dpo(a, s, torch, threads):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = load_model(a.model_dir, torch)
    ref = load_model(a.model_dir, torch)
    V = model.config.vocab_size
    p, c, r = workloads.dpo_batch(V, s)
    P, Lp, Lc = s["pairs"], s["prompt_len"], s["completion_len"]

    # What a user would feed: text. TRL 1.16 has no pre-tokenized DPO input; it tokenizes prompt and
    # prompt+completion and appends EOS to the completions.
    text_ds = Dataset.from_dict({
        "prompt": [ids_to_text(tok, x) for x in p],
        "chosen": [" " + ids_to_text(tok, x) for x in c],
        "rejected": [" " + ids_to_text(tok, x) for x in r],
    })
    exact_ds = Dataset.from_dict({
        "prompt_ids": [x.tolist() for x in p], "chosen_ids": [x.tolist() for x in c],
        "rejected_ids": [x.tolist() for x in r],
    })

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = DPOConfig(
            **common_args(s, out_dir, threads), per_device_train_batch_size=P,
            beta=workloads.DPO_BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False,
            max_length=None, padding_free=False, pad_to_multiple_of=None, disable_dropout=True,
            sync_ref_model=False, use_weighting=False, ld_alpha=None, label_smoothing=0.0,
        )
        timer = make_timer_callback()
        trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=text_ds,
                             processing_class=tok, callbacks=[timer])
        # What TRL's own text preprocessing produced, for the note.
        tp = trainer.train_dataset
        trl_lens = (sorted({len(x) for x in tp["prompt_ids"]}), sorted({len(x) for x in tp["chosen_ids"]}),
                    sorted({len(x) for x in tp["rejected_ids"]}))
        trl_exact = (tp["prompt_ids"] == exact_ds["prompt_ids"]
                     and [x[:Lc] for x in tp["chosen_ids"]] == exact_ds["chosen_ids"]
                     and [x[:Lc] for x in tp["rejected_ids"]] == exact_ds["rejected_ids"])
        trainer.train_dataset = exact_ds

        # Check one collated batch: [2P, Lp+Lc], no padding, completion mask on exactly Lc tokens per row.
        batch = trainer.data_collator([exact_ds[i] for i in range(P)])
        assert tuple(batch["input_ids"].shape) == (2 * P, Lp + Lc), batch["input_ids"].shape
        assert bool(batch["attention_mask"].all()), "unexpected padding"
        assert batch["completion_mask"].sum(1).eq(Lc).all(), "completion mask != completion_len"
        # Record the shape of every batch the trainer collates during train()
        shapes, collate = [], trainer.data_collator

        def recording_collator(examples):
            out = collate(examples)
            shapes.append((tuple(out["input_ids"].shape), int(out["attention_mask"].sum()),
                           int(out["completion_mask"].sum())))
            return out

        trainer.data_collator = recording_collator
        torch.set_num_threads(threads)
        trainer.train()
        assert not getattr(trainer.model, "is_activation_checkpointing", False), "activation checkpointing is on"

    assert len(timer.ends) == s["warmup"] + s["steps"], (len(timer.ends), s)
    want = ((2 * P, Lp + Lc), 2 * P * (Lp + Lc), 2 * P * Lc)
    assert shapes and all(x == want for x in shapes), (shapes, want)
    note = (f"{versions(torch)}; trl.DPOTrainer sigmoid beta {workloads.DPO_BETA}, separate ref model, "
            f"batch [{2 * P},{Lp + Lc}] unpadded; fed exact token ids via trainer.train_dataset "
            f"(TRL 1.16 DPO accepts text only; its own text preprocessing gave prompt/chosen/rejected lengths "
            f"{trl_lens[0]}/{trl_lens[1]}/{trl_lens[2]} vs spec {Lp}/{Lc}/{Lc}, ids "
            f"{'= workload ids' if trl_exact else 'differ from the workload ids (text does not round-trip)'}, "
            f"and it appends one EOS to every completion); "
            f"TRL computes log-probs with its fused chunked lm head; {optimizer_note(timer, trainer.args)}")
    return timer, note


# ----------------------------------------------------------------------------------------------------- GRPO


def run_grpo(a, s, torch, threads):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = load_model(a.model_dir, torch)
    V = model.config.vocab_size
    N, G, Lp, T = s["prompts"], s["G"], s["prompt_len"], s["new_tokens"]
    ids = workloads.prompts(V, N, Lp)
    texts = [ids_to_text(tok, x) for x in ids]
    roundtrip = all(tok(text=t)["input_ids"] == x.tolist() for t, x in zip(texts, ids))
    text_to_ids = {t: x.tolist() for t, x in zip(texts, ids)}
    if len(text_to_ids) != N:
        raise SystemExit("duplicate prompt texts")

    seen = {"completion_lens": set(), "prompt_lens": set(), "calls": 0}

    class ExactPromptGRPOTrainer(GRPOTrainer):
        """Records the prompt lengths; where the text does not round-trip (smollm2's BPE), the prompt str -> ids
        step returns the exact workload ids instead of re-tokenizing. Nothing else differs from GRPOTrainer."""

        def _tokenize_prompts(self, prompts):
            if not roundtrip and all(isinstance(p, str) and p in text_to_ids for p in prompts):
                out = [list(text_to_ids[p]) for p in prompts], None, {}
            else:
                out = super()._tokenize_prompts(prompts)
            seen["prompt_lens"].update(len(x) for x in out[0])
            return out

    def reward_even_fraction(prompts, completions, completion_ids, **kwargs):
        seen["calls"] += 1
        seen["completion_lens"].update(len(c) for c in completion_ids)
        return [workloads.reward(c) for c in completion_ids]

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = GRPOConfig(
            **common_args(s, out_dir, threads),
            per_device_train_batch_size=N * G, generation_batch_size=N * G, num_generations=G,
            max_completion_length=T, temperature=1.0, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
            # EOS can not be sampled before T tokens: exactly T tokens per completion (checked below)
            generation_kwargs={"min_new_tokens": T},
            beta=workloads.GRPO_BETA, epsilon=workloads.GRPO_EPS, num_iterations=1, loss_type="grpo",
            scale_rewards="group", use_bias_correction_kl=False, mask_truncated_completions=False,
            use_vllm=False, shuffle_dataset=False, disable_dropout=True, pad_to_multiple_of=None,
            log_completions=False,
        )
        timer = make_timer_callback()
        trainer = ExactPromptGRPOTrainer(model=model, reward_funcs=reward_even_fraction, args=cfg,
                              train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tok,
                              callbacks=[timer])
        assert trainer.args.steps_per_generation == 1, trainer.args.steps_per_generation
        torch.set_num_threads(threads)
        trainer.train()
        assert not getattr(trainer.model, "is_activation_checkpointing", False), "activation checkpointing is on"

    assert len(timer.ends) == s["warmup"] + s["steps"], (len(timer.ends), s)
    assert seen["calls"] == len(timer.ends), seen
    assert seen["prompt_lens"] == {Lp}, seen
    lens = sorted(seen["completion_lens"])
    if lens != [T]:
        print(f"WARNING: TRL produced completion lengths {lens}, asked for {T}", file=sys.stderr)
    note = (f"{versions(torch)}; trl.GRPOTrainer, transformers generate (no vLLM), {N} prompts x G={G}, "
            f"one generation round = one optimizer step, beta {workloads.GRPO_BETA} (k3 KL, "
            f"use_bias_correction_kl=False), eps {workloads.GRPO_EPS}, loss_type grpo; "
            f"EOS disabled via generation_kwargs min_new_tokens={T}; completion lengths seen {lens}; "
            f"plain-text prompts, " + ("text tokenizes back to the exact workload ids" if roundtrip else
                                       "text does not round-trip through the BPE, so _tokenize_prompts is "
                                       "overridden to return the exact workload ids") + f" (prompt_len {Lp}); "
            f"{optimizer_note(timer, trainer.args)}")
    return timer, note


# ----------------------------------------------------------------------------------------------------- sample


def run_sample(a, s, torch, threads):
    from transformers import GenerationConfig

    model = load_model(a.model_dir, torch).eval()
    V = model.config.vocab_size
    B, Lp, T = s["batch"], s["prompt_len"], s["new_tokens"]
    input_ids = torch.as_tensor(workloads.prompts(V, B, Lp), dtype=torch.long)
    attn = torch.ones_like(input_ids)
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    gcfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=T,
                            min_new_tokens=T, use_cache=True, eos_token_id=eos,
                            pad_token_id=pad if pad is not None else eos, disable_compile=True)
    torch.manual_seed(0)
    stamps = []
    with torch.inference_mode():
        for i in range(s["warmup"] + s["steps"]):
            if i in (0, s["warmup"]):
                stamps.append(time.perf_counter())
            out = model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gcfg)
            assert tuple(out.shape) == (B, Lp + T), out.shape
            if i == 0:
                first, first_end = time.perf_counter() - stamps[0], time.time()
    per_call = (time.perf_counter() - stamps[-1]) / s["steps"]
    note = (f"{versions(torch)}; model.generate do_sample temperature 1 top_k 0 top_p 1, "
            f"min_new_tokens=max_new_tokens={T}, KV cache, batch [{B},{Lp}]; {s['steps']} calls end to end")
    return [workloads.row(a.workload, a.model, FRAMEWORK, "tokens_per_s", B * T / per_call, "tok/s", note=note),
            workloads.row(a.workload, a.model, FRAMEWORK, "first_step", first, "s", note="the first call"),
            workloads.row(a.workload, a.model, FRAMEWORK, "time_to_first_step", first_end - a.t0, "s",
                          note="launch to the end of the first call")]


def step_rows(a, s, timer, note) -> list[dict]:
    """`step_time` end to end over the timed steps, their per-step median, and the first step's times."""
    w = s["warmup"]
    per_step = [e - b for b, e in zip(timer.begins, timer.ends)]
    return [workloads.row(a.workload, a.model, FRAMEWORK, "step_time", (timer.ends[-1] - timer.begins[w]) / s["steps"],
                          "s", note=f"{note}; {s['steps']} steps end to end (first timed step's begin to last end)"),
            workloads.row(a.workload, a.model, FRAMEWORK, "step_time_median", statistics.median(per_step[w:]), "s",
                          note="median of on_step_begin..on_step_end", times=[round(x, 4) for x in per_step[w:]]),
            workloads.row(a.workload, a.model, FRAMEWORK, "first_step", per_step[0], "s",
                          note="the first optimizer step (eager torch compiles nothing)"),
            workloads.row(a.workload, a.model, FRAMEWORK, "time_to_first_step", timer.first_end - a.t0, "s",
                          note="launch to the end of the first optimizer step")]


def main(argv=None):
    a = parse_args(argv)
    a.t0 = a.t0 or T0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    threads = set_threads(a.threads)

    import torch  # noqa: E402  (after the thread settings)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = workloads.spec(a.model, a.workload, a.quick)
    if a.workload == "sample":
        rows = run_sample(a, s, torch, threads)
    else:
        run = run_dpo if a.workload == "dpo_step" else run_grpo
        rows = step_rows(a, s, *run(a, s, torch, threads))
    cfg = json.loads((Path(a.model_dir) / "config.json").read_text())
    for k, v in workloads.step_flops(FRAMEWORK, a.workload, cfg, s).items():
        rows.append(workloads.row(a.workload, a.model, FRAMEWORK, k, v, "FLOP"))
    if a.quick:
        rows[0]["note"] += "; --quick (numbers meaningless)"
    rows.append(workloads.row(a.workload, a.model, FRAMEWORK, "peak_rss", workloads.peak_rss_mib(), "MiB"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    for r in rows:
        print(f"{r['workload']:<22} {r['metric']:<22} {r['value']:.6g} {r['unit']}")


if __name__ == "__main__":
    main()
