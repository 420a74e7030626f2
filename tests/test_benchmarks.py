"""The benchmark harness's own arithmetic (benchmarks/), not speed: MFU, ratios, FLOP counts, workloads."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import workloads  # noqa: E402
from benchmarks import bench  # noqa: E402
from benchmarks.runners import jaxalign_runner  # noqa: E402
from jaxalign.models import tiny_config  # noqa: E402


def _row(w, fw, metric, value, unit="s"):
    return {"workload": w, "framework": fw, "metric": metric, "value": value, "unit": unit}


def test_mfu_is_flops_over_time_over_the_measured_ceiling():
    rows = [_row("matmul/jax", "matmul-ceiling", "gflops", 100.0, "GFLOP/s"),
            _row("grpo/m", "jaxalign", "step_time", 1.0), _row("grpo/m", "jaxalign", "generation_time", 0.6),
            _row("grpo/m", "jaxalign", "model_flops", 50e9, "FLOP"),
            _row("grpo/m", "jaxalign", "train_flops", 20e9, "FLOP")]
    got = {r["metric"]: r["value"] for r in bench.add_mfu(rows) if r["metric"].endswith("mfu")}
    assert got == {"mfu": 50.0, "train_mfu": 50.0}  # 50e9/1/100e9; 20e9/(1-0.6)/100e9


def test_matmul_mfu_counts_the_reference_and_the_forward_backward_only():
    rows = [_row("matmul/jax", "matmul-ceiling", "gflops", 100.0, "GFLOP/s"),
            _row("dpo_parts/m", "jaxalign", "matmul_time", 0.8),
            _row("dpo_parts/m", "jaxalign", "train_step_time", 1.0),
            _row("dpo_parts/m", "jaxalign", "matmul_flops", 60e9, "FLOP")]
    got = [r for r in bench.add_mfu(rows) if r["metric"].endswith("mfu")]
    assert [(r["metric"], r["value"]) for r in got] == [("matmul_mfu", 75.0)]  # 60e9 / 0.8 s / 100e9


def test_paired_mfu_takes_each_round_against_its_own_gemm_rate():
    # rounds: 60e9 / 0.8 s / 100e9 = 75%, 60e9 / 0.5 / 200e9 = 60%, 60e9 / 1.0 / 50e9 = 120%; median 75%
    assert jaxalign_runner.paired_mfu(60e9, [0.8, 0.5, 1.0], [100.0, 200.0, 50.0]) == pytest.approx(75.0)
    with pytest.raises(ValueError):
        jaxalign_runner.paired_mfu(60e9, [0.8, 0.5], [100.0])


def test_ratios_read_as_jaxalign_ahead_when_above_one():
    rows = [_row("dpo/m", "jaxalign", "step_time", 1.0), _row("dpo/m", "trl", "step_time", 3.0),
            _row("s/m", "jaxalign", "tokens_per_s", 10.0, "tok/s"), _row("s/m", "trl", "tokens_per_s", 40.0, "tok/s"),
            _row("s/m", "jaxalign", "peak_rss", 200.0, "MiB"), _row("s/m", "trl", "peak_rss", 100.0, "MiB")]
    lines = bench.table(rows, ["jaxalign", "trl"]).splitlines()
    assert lines[2].endswith("| 3.00× |")  # trl 3x slower
    assert lines[3].endswith("| 0.25× |")  # trl 4x more tokens/s
    assert lines[4].endswith("| 0.50× |")  # trl half the memory


def test_forward_flops_by_hand():
    cfg = tiny_config("llama", hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=4, vocab_size=10)
    # per layer: q 8*2*4 + k,v 2*8*1*4 + o 2*4*8 + mlp 3*8*16 = 64+64+64+384 = 576; head 8*10 = 80
    matmul_params = 2 * 576 + 80
    attn = 2 * 4 * 5 * 2 * 4  # layers * 4 * context * heads * head_dim
    assert jaxalign_runner.forward_flops(cfg, tokens=3, context=5) == 3 * (2 * matmul_params + attn)
    # LM head on 1 of the 3 tokens (a GRPO step scores the completion only): 2 * 80 FLOPs per headed token
    assert jaxalign_runner.forward_flops(cfg, tokens=3, context=5, head_tokens=1) == \
        3 * (2 * 2 * 576 + attn) + 1 * 2 * 80


def test_workload_data_is_deterministic_and_shaped():
    s = workloads.spec("smollm2", "dpo_step")
    p, c, r = workloads.dpo_batch(49152, s)
    p2, _, _ = workloads.dpo_batch(49152, s)
    np.testing.assert_array_equal(p, p2)
    assert p.shape == (s["pairs"], s["prompt_len"]) and c.shape == r.shape == (s["pairs"], s["completion_len"])
    assert p.min() >= 3 and not np.array_equal(c, r)
    assert workloads.spec("tiny", "sample", quick=True)["steps"] == 1
    assert workloads.reward([2, 3, 4, 5]) == 0.5
    assert 0 < workloads.peak_rss_mib() < 1e6


def test_rounds_report_the_median_with_the_lowest_and_highest():
    runs = [[_row("d/m", "trl", "step_time", v), _row("d/m", "trl", "model_flops", 5.0, "FLOP")]
            for v in (2.0, 1.5, 3.0)]
    out = {r["metric"]: r for r in bench.aggregate_rounds(runs)}
    assert out["step_time"]["value"] == 2.0 and (out["step_time"]["low"], out["step_time"]["high"]) == (1.5, 3.0)
    assert out["step_time"]["rounds"] == [2.0, 1.5, 3.0] and out["model_flops"]["value"] == 5.0
    failed = [_row("d/m", "trl", "error", float("nan"), "")]
    out = bench.aggregate_rounds([runs[0], failed, runs[2]])  # a failed round is left out
    assert out[0]["value"] == 2.5 and out[0]["rounds"] == [2.0, 3.0]
    assert bench.aggregate_rounds([failed]) == failed


def test_first_step_and_rss_split_into_round_one_and_the_later_rounds():
    def run(step, first, rss):
        return [_row("d/m", "tunix", "step_time", step), _row("d/m", "tunix", "first_step", first),
                _row("d/m", "tunix", "peak_rss", rss, "MiB")]

    out = {r["metric"]: r["value"] for r in bench.aggregate_rounds([run(1.0, 9.0, 600.0), run(1.2, 0.5, 350.0),
                                                                    run(1.1, 0.7, 360.0)])}
    assert out == {"step_time": 1.1, "first_step_cold": 9.0, "first_step_warm": 0.6,
                   "peak_rss_first_run": 600.0, "peak_rss": 355.0}
    one = {r["metric"] for r in bench.aggregate_rounds([run(1.0, 9.0, 600.0)])}
    assert one == {"step_time", "first_step_cold", "peak_rss_first_run"}  # one round: no warm rows


def test_every_framework_gets_mfu_against_the_best_ceiling_and_sampler_calls_count():
    rows = [_row("matmul/jax", "matmul-ceiling", "gflops", 100.0, "GFLOP/s"),
            _row("matmul/torch", "matmul-ceiling", "gflops", 200.0, "GFLOP/s"),
            _row("d/m", "trl", "step_time", 2.0), _row("d/m", "trl", "model_flops", 100e9, "FLOP"),
            _row("s/m", "tunix", "tokens_per_s", 64.0, "tok/s"), _row("s/m", "tunix", "model_flops", 10e9, "FLOP")]
    got = {(r["workload"], r["metric"]): r["value"] for r in bench.add_mfu(rows, {"s/m": {"batch": 8, "new_tokens": 16}})}
    assert got[("d/m", "mfu")] == 25.0 and got[("d/m", "flop_rate")] == 50.0  # 100e9 / 2 s / 200e9
    # a sampler call: 8 x 16 tokens at 64 tok/s = 2 s; 10e9 / 2 / 200e9 = 2.5%
    assert got[("s/m", "mfu")] == pytest.approx(2.5) and got[("s/m", "flop_rate")] == pytest.approx(5.0)


def test_step_flops_count_what_each_framework_computes():
    cfg = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=4, vocab_size=10)
    body, head = 2 * 2 * 576, 2 * 80  # per token: projections + MLP of 2 layers; per headed token: LM head
    attn = lambda context: 2 * 4 * context * 2 * 4  # noqa: E731
    dpo = dict(pairs=1, prompt_len=3, completion_len=2)  # 2 rows of 5 tokens
    fwd = 10 * (body + attn(5))
    assert workloads.step_flops("jaxalign", "dpo_step", cfg, dpo, score_width=2)["model_flops"] == 4 * (fwd + 4 * head)
    assert workloads.step_flops("trl", "dpo_step", cfg, dpo)["model_flops"] == 4 * (fwd + 4 * head)
    assert workloads.step_flops("tunix", "dpo_step", cfg, dpo)["model_flops"] == 4 * (fwd + 10 * head)
    # sampler, 1 prompt of 3 tokens, 3 new tokens: a prefill and 2 decode forwards (contexts 4, 5);
    # Tunix heads every prefill position and runs one decode forward more (context 6).
    s = dict(batch=1, prompt_len=3, new_tokens=3)
    decode = (body + attn(4) + head) + (body + attn(5) + head)
    assert workloads.step_flops("trl", "sample", cfg, s)["model_flops"] == 3 * (body + attn(3)) + head + decode
    assert workloads.step_flops("tunix", "sample", cfg, s)["model_flops"] == \
        3 * (body + attn(3) + head) + decode + body + attn(6) + head
    # GRPO, 1 prompt x G = 2: jaxalign prefills the prompt once and runs one more forward (old log-probs).
    g = dict(prompts=1, G=2, prompt_len=3, new_tokens=2)
    train = 10 * (body + attn(5)) + 4 * head  # 2 rows x 5 tokens, the head on 2 x 2 completion tokens
    gen_j = 3 * (body + attn(3)) + head + 2 * (body + attn(4) + head)
    gen_t = 6 * (body + attn(3)) + 2 * head + 2 * (body + attn(4) + head)
    assert workloads.step_flops("jaxalign", "grpo_step_g4", cfg, g)["model_flops"] == gen_j + 5 * train
    assert workloads.step_flops("trl", "grpo_step_g4", cfg, g)["model_flops"] == gen_t + 4 * train


def test_fair_table_shows_median_spread_and_marks_rows_below_the_target():
    rows = []
    for fw, t in (("jaxalign", 1.0), ("trl", 2.0), ("tunix", 1.1)):
        rows += bench.aggregate_rounds([[_row("dpo_step/smollm2", fw, "step_time", t * k),
                                         _row("dpo_step/smollm2", fw, "model_flops", 10e9, "FLOP")]
                                        for k in (1.0, 0.9, 1.2)])
    rows = bench.add_mfu(rows + [_row("matmul/jax", "matmul-ceiling", "gflops", 100.0, "GFLOP/s")])
    lines = bench.fair_table(rows, ["jaxalign", "trl", "tunix"]).splitlines()
    assert lines[2] == ("| DPO step, SmolLM2-135M | 1.00 s (0.90–1.20) | 2.00 s (1.80–2.40) | 1.10 s (0.99–1.32) "
                        "| 2.00× | **1.10×** |")
    assert "| 1.00 × 2.00 | 1.00 × 1.10 |" in lines[6]  # same FLOPs: the whole lead is per FLOP


def test_the_higher_ceiling_measurement_is_kept():
    first = [_row("matmul/jax", "matmul-ceiling", "gflops", 300.0, "GFLOP/s") | {"note": "a"},
             _row("d/m", "jaxalign", "step_time", 1.0)]
    again = [_row("matmul/jax", "matmul-ceiling", "gflops", 450.0, "GFLOP/s") | {"note": "b"}]
    merged = bench.merge_ceilings(first, again)
    assert merged[0]["value"] == 450.0 and merged[0]["note"] == "b; best of 2 measurements (300, 450)"
    assert merged[1] == first[1]


def test_profile_wall_time_splits_overlapping_ops_evenly():
    from benchmarks import profile_step

    ms = 1_000_000  # events are in ns
    # dot alone 0-4 ms; dot and copy together 4-6 ms; gap 6-8 ms; copy alone 8-9 ms.
    events = [(0, 6 * ms, "dot"), (4 * ms, 6 * ms, "copy"), (8 * ms, 9 * ms, "copy")]
    wall, covered, span = profile_step.wall_by_kind(events)
    assert wall == {"dot": 5.0, "copy": 2.0}  # 4 + 2/2; 2/2 + 1
    assert covered == 7.0 and span == 9.0


def test_ratio_is_none_where_a_side_is_missing_or_nan():
    rows = [_row("d/m", "jaxalign", "step_time", 2.0), _row("d/m", "trl", "step_time", float("nan")),
            _row("d/m", "tunix", "step_time", 3.0), _row("s/m", "jaxalign", "tokens_per_s", 30.0, "tok/s"),
            _row("s/m", "tunix", "tokens_per_s", 20.0, "tok/s")]
    assert bench.ratio(rows, "d/m", "step_time", "tunix") == 1.5
    assert bench.ratio(rows, "s/m", "tokens_per_s", "tunix") == 1.5
    assert bench.ratio(rows, "d/m", "step_time", "trl") is None  # a failed peer run
    assert bench.ratio(rows, "s/m", "tokens_per_s", "trl") is None  # no row at all
    assert bench.table(rows, ["jaxalign", "trl", "tunix"]).splitlines()[2].endswith("| – | 1.50× |")


def test_dpo_scaling_points_are_tokens_per_step_along_length_and_batch():
    from benchmarks import plot

    times = {"dpo_step": 4.0, "dpo_step@L64": 2.5, "dpo_step@L256": 9.0, "dpo_step@B1": 2.0, "dpo_step@B4": 8.0}
    rows = [_row(f"{w}/smollm2", "jaxalign", "step_time", t) for w, t in times.items()]
    rows.append(_row("dpo_step/tiny", "jaxalign", "step_time", 0.01))  # another model: not a point
    # SmolLM2's DPO workload: 2 pairs of 64 + 64 tokens, 2 sequences per pair -> 512 policy tokens.
    assert plot.dpo_scaling(rows) == {"length": [(256, 2.5), (512, 4.0), (1024, 9.0)],
                                      "batch": [(256, 2.0), (512, 4.0), (1024, 8.0)]}


def test_bench_plot_draws_a_run_with_gaps(tmp_path):
    from benchmarks import plot

    rows = [_row("dpo_step/tiny", "jaxalign", "step_time", 0.03), _row("dpo_step/tiny", "trl", "step_time", 0.07),
            _row("dpo_step/tiny", "tunix", "step_time", float("nan")),
            _row("dpo_step/tiny", "jaxalign", "peak_rss", 500.0, "MiB"),
            _row("dpo_step/tiny", "trl", "peak_rss", 450.0, "MiB"),
            _row("dpo_step/smollm2", "jaxalign", "step_time", 4.0),
            _row("dpo_step/smollm2", "jaxalign", "mfu", 61.0, "%"),
            _row("dpo_step@B4/smollm2", "jaxalign", "step_time", 9.0),
            _row("matmul/jax", "matmul-ceiling", "gflops", 190.0)]
    path = plot.plot(rows, tmp_path / "bench.png")
    from matplotlib.image import imread

    image = imread(path)
    assert image.shape[:2] == (1000, 1300)
    assert image[..., :3].std() > 0.05  # something was drawn


def test_bench_plot_draws_a_jaxalign_only_run(tmp_path):
    """`--frameworks jaxalign --models tiny` (a smoke run): no peer, no SmolLM2 row, still a plot."""
    from benchmarks import plot

    rows = [_row("dpo_step/tiny", "jaxalign", "step_time", 0.03), _row("matmul/jax", "matmul-ceiling", "gflops", 190.0)]
    assert plot.plot(rows, tmp_path / "bench.png").stat().st_size > 10_000


def test_compile_memory_parses_options_and_counts_distinct_kernels():
    """`benchmarks/compile_memory.py`: KEY=VALUE options keep their types, and the kernel count
    read from XLA's dump is one per distinct fusion (identical fusions share one kernel)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import compile_memory

    assert compile_memory._parse_options(["a=true", "b=FALSE", "c=3", "d=LIBRARY_FUSION_TYPE_DOT"]) == {
        "a": True, "b": False, "c": 3, "d": "LIBRARY_FUSION_TYPE_DOT"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        compile_memory._parse_options(["no_value"])

    def program(xs):
        return [x * 0.9 + jnp.sqrt(x * x + 1e-8) for x in xs]

    meter = compile_memory.PeakRSS()
    counts = {}
    for distinct in (True, False):
        xs = [jax.ShapeDtypeStruct((16 + (i if distinct else 0), 8), jnp.float32) for i in range(3)]
        base, grew, seconds, counts[distinct] = compile_memory._compile(jax.jit(program).lower(xs), None, meter)
        assert base > 0 and grew >= 0 and seconds > 0
    assert counts == {True: 3, False: 1}


def test_gemm_shapes_cover_the_step_flops_the_mfu_counts():
    """benchmarks/gemm_shapes.py: its GEMMs are the forward and backward the MFU counts, less attention."""
    from benchmarks import gemm_shapes

    cfg = tiny_config("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,  # SmolLM2-135M's
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152)
    gemms = gemm_shapes.step_gemms(cfg, rows=256, head_rows=128)
    assert sum(g.flops for g in gemms) == 3 * jaxalign_runner.forward_flops(cfg, 256, context=0, head_tokens=128)
    by_name = {g.name: g for g in gemms}
    assert by_name["gate/up xᵀ·dy"].flops == 2 * 576 * 256 * 1536 * 2 * 30  # x^T dy: K=rows, count 2 per layer
    # total FLOPs over total time: 1 GFLOP at 100 GFLOP/s and 3 at 300 take 0.02 s for 4 GFLOP (200, where a
    # FLOP-weighted mean of the rates would give 250); 1 and 1 take 0.0133 s for 2 (150, the mean 200)
    assert gemm_shapes.weighted_rate([1.0, 3.0], [100.0, 300.0]) == pytest.approx(200.0)
    assert gemm_shapes.weighted_rate([1.0, 1.0], [100.0, 300.0]) == pytest.approx(150.0)
