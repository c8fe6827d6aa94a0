"""`dsdkit bench`: the reference computation agrees with our scorer, FLOPs are counted right, records are complete."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner


def _hand_counted_flops(scorer) -> tuple[int, int]:
    """2 x multiply-adds of every Conv2d, Linear and attention product, from module shapes seen by hooks:
    ``(total, attention products alone)``."""
    import torch
    from diffusers.models.attention_processor import Attention

    model = scorer.model
    total = [0]
    products = [0]

    def conv(module, inputs, output):
        total[0] += (
            2 * output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        )

    def linear(module, inputs, output):
        total[0] += 2 * output.numel() * module.in_features

    def attention(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if hidden.ndim == 4:  # the VAE-style 4-D input is flattened by the processor
            hidden = hidden.flatten(2).transpose(1, 2)
        keys = hidden.shape[1] if context is None else context.shape[1]
        inner = module.to_q.out_features
        total[0] += 2 * 2 * hidden.shape[0] * hidden.shape[1] * keys * inner  # QKᵀ and P·V
        products[0] += 2 * 2 * hidden.shape[0] * hidden.shape[1] * keys * inner

    handles = []
    for module in model.unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_hook(attention, with_kwargs=True))
    latent = scorer.resolution // model.vae_scale_factor
    x_t = torch.zeros(1, model.latent_channels, latent, latent)
    states = torch.zeros(1, 77, int(model.text_encoder.config.hidden_size))
    try:
        timesteps = scorer.noising(torch.tensor([0])).timesteps
        # The plain UNet forward: the count comes from module shapes, which no attention processor changes, so it
        # stays independent of the scoring code whose count it checks.
        with torch.inference_mode():
            model.unet(x_t, timesteps, encoder_hidden_states=states)
    finally:
        for handle in handles:
            handle.remove()
    return total[0], products[0]


def test_counted_unet_flops_match_a_hand_count(tiny_model):
    from dsdkit.jobs.bench import unet_flop_counts, unet_flops
    from dsdkit.pytorch.scorer import Scorer

    scorer = Scorer(tiny_model)
    counted = unet_flop_counts(scorer)
    by_hand, products_by_hand = _hand_counted_flops(scorer)
    assert counted["total"] == unet_flops(scorer) == pytest.approx(by_hand, rel=0.02)
    assert counted["attention_scores"] == pytest.approx(products_by_hand, rel=0.02)
    assert counted["total"] > counted["attention_scores"] > 1e6


def test_bench_reference_agrees_and_reports(tiny_model_dir):
    from dsdkit.jobs.bench import BenchConfig, format_record, run_bench

    record = run_bench(BenchConfig(model=str(tiny_model_dir), timesteps=2, images=2, captions=3, batch_sizes=[4, 8]))
    assert record["agreement"]["ok"] and record["agreement"]["max_abs_diff"] < 1e-5
    engines = [(r["engine"], r["batch"]) for r in record["rows"]]
    assert engines == [
        ("pytorch", 4),
        ("pytorch (B3 on)", 4),
        ("pytorch", 8),
        ("pytorch (B3 on)", 8),
        ("reference", 2),
    ]
    rows = {(r["engine"], r["batch"]): r for r in record["rows"]}
    # UNet evaluations are counted from the runs: ours N·M·S (no unconditional pass needed), B3 adds N·S, the
    # reference runs both halves for every pair and timestep.
    assert rows[("pytorch", 4)]["unet_evaluations"] == 2 * 3 * 2
    assert rows[("pytorch (B3 on)", 4)]["unet_evaluations"] == 2 * 3 * 2 + 2 * 2
    assert rows[("reference", 2)]["unet_evaluations"] == 2 * 2 * 3 * 2
    assert set(record["ratios_vs_reference"]) == {
        "pytorch batch 4",
        "pytorch (B3 on) batch 4",
        "pytorch batch 8",
        "pytorch (B3 on) batch 8",
    }
    assert record["unet_gflops_per_evaluation"] > record["unet_gflops_attention_scores"] > 0 and record["pairs"] == 6
    for row in record["rows"]:  # achieved throughput is the counted FLOPs at the measured evaluation rate
        assert row["achieved_gflop_per_s"] == pytest.approx(
            row["evaluations_per_s"] * record["unet_gflops_per_evaluation"], rel=1e-2
        )
    fastest = max((r for r in record["rows"] if r["engine"] == "pytorch"), key=lambda r: r["pairs_per_s"])
    assert record["best_batch"]["pytorch"] == fastest["batch"]
    assert "best batch: pytorch" in format_record(record)
    assert record["machine"]["cpus"] >= 1 and record["versions"]["torch"]


def test_bench_record_has_the_measured_matmul_peak_and_the_fraction_of_it(micro_model_dir):
    """Each row's UNet FLOP rate is reported against a GEMM peak measured in the same run (fp32 4096² on the CPU),
    and a model loaded once can be passed in (the GPU kit measures many jobs on one model)."""
    from dsdkit.jobs.bench import BenchConfig, format_record, measure_matmul_peak, run_bench
    from dsdkit.pytorch.models import load_model

    model = load_model(micro_model_dir, device="cpu")
    config = BenchConfig(model=str(micro_model_dir), timesteps=1, images=1, captions=2, engines=["pytorch"])
    record = run_bench(config, model=model)
    peak = record["matmul_peak"]
    assert peak["shape"] == [4096, 4096, 4096] and peak["dtype"] == "fp32" and peak["device"] == "cpu"
    assert peak["repeats"] >= 3 and peak["threads"] >= 1 and peak["median_s"] > 0
    assert peak["gflop_per_s"] == pytest.approx(2 * 4096**3 / peak["median_s"] / 1e9, rel=1e-3)
    assert peak["tflop_per_s"] == pytest.approx(peak["gflop_per_s"] / 1000, rel=1e-3)
    assert record["model"]["load_s"] is None  # loaded by the caller, not timed here
    (row,) = record["rows"]
    fraction = row["achieved_gflop_per_s"] / peak["gflop_per_s"]
    assert 0 < row["matmul_peak_fraction"] == pytest.approx(fraction, rel=2e-2)
    assert row["mfu"] is None  # no datasheet peak on a CPU
    assert "of GEMM" in format_record(record) and f"{peak['gflop_per_s']:.4g} GFLOP/s" in format_record(record)
    # One measurement per process and setting: the next job reuses it, as a copy its caller may change.
    again = measure_matmul_peak("cpu", "fp32")
    assert again == peak and again is not record["matmul_peak"]
    small = measure_matmul_peak("cpu", "fp32", size=256, repeats=2)
    assert small["shape"] == [256, 256, 256] and small["repeats"] == 2


def test_bench_refuses_a_model_of_another_precision(micro_model_dir):
    from dsdkit.runtime.errors import ConfigError

    from dsdkit.jobs.bench import BenchConfig, run_bench
    from dsdkit.pytorch.models import load_model

    model = load_model(micro_model_dir, device="cpu")
    with pytest.raises(ConfigError, match="runs in fp32, the config asks for bf16"):
        run_bench(BenchConfig(dtype="bf16", engines=["pytorch"]), model=model)


# Configs the bench sends through the reference, each with a neighbouring config (one knob changed) whose scores
# must be far from the reference's: agreement then shows the reference implements that knob, not that both ignore it.
REFERENCE_CASES = {
    "bench check: discffusion, B3 on, no denoise": (
        "discffusion",
        {"num_timesteps": 2, "denoise_term": False, "uncond_in_attention": True},
        {"uncond_in_attention": False},
    ),
    "discffusion preset: B3 off, denoise on": ("discffusion", {"num_timesteps": 2}, {"denoise_term": False}),
    "normalize=uncond, words-eos, lambda 2": (
        "discffusion",
        {"num_timesteps": 2, "denoise_term": False, "normalize": "uncond", "tokens": "words-eos", "lse_lambda": 2.0},
        {"tokens": "all"},
    ),
    "paper: image-lse, dynamic heads, all layers, B3 on": (
        "paper",
        {"noise_levels": (0.3, 0.7), "uncond_in_attention": True},
        {"heads": "uniform"},
    ),
}
CAPTIONS = ["a red circle", "two blue squares on a table"]


def _tolerance(scores) -> float:
    """1e-5 relative to the scores' scale (normalised scores are small: then 1e-5 absolute)."""
    import numpy as np

    return 1e-5 * max(1.0, float(np.abs(scores).max()))


def _scores_and_reference(model, images, case: str):
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit.pytorch.reference import reference_scores
    from dsdkit.pytorch.scorer import Scorer

    preset, knobs, neighbour = REFERENCE_CASES[case]
    config = ScoringConfig.from_preset(preset, **knobs)
    ours = Scorer(model, config, batch_size=3).score(images, CAPTIONS)
    scorer = Scorer(model, config, batch_size=2)
    processors = dict(model.unet.attn_processors)
    expected = reference_scores(scorer, images, CAPTIONS)
    _assert_left_as_found(model.unet, processors)
    return ours, expected, config.replace(**neighbour)


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_reference_agrees_with_the_scorer(case, tiny_model, shape_images):
    """The reference (stock attention, its own pooling) and the Scorer agree on every config the bench runs."""
    import numpy as np

    from dsdkit.pytorch.scorer import Scorer

    ours, expected, neighbour = _scores_and_reference(tiny_model, shape_images[:2], case)
    tolerance = _tolerance(ours)
    assert np.abs(ours - expected).max() <= tolerance
    # Agreement must be able to fail: the pairs differ, and so does the config with one knob changed.
    assert np.ptp(expected) > 20 * tolerance
    other = Scorer(tiny_model, neighbour, batch_size=3).score(shape_images[:2], CAPTIONS)
    assert np.abs(other - expected).max() > 20 * tolerance


def _assert_left_as_found(unet, processors) -> None:
    """The reference leaves the UNet with the processors it found and none of its hooks."""
    assert all(unet.attn_processors[name] is processor for name, processor in processors.items())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in unet.modules())


def _text_lse_over_image_tokens(logits, mask, lam):
    import torch

    return (torch.logsumexp(lam * logits, dim=-2) / lam).mean(dim=-1)


def _image_lse_over_text_tokens(probs, mask, lam):
    import torch

    return (torch.logsumexp(lam * probs, dim=-1) / lam).mean(dim=-1)


def _every_position_kept(roles, tokens, attended=None):
    import torch

    return torch.ones(roles.shape, dtype=torch.bool)


def _uniform_weights(probs, mask, lam):
    import torch

    return torch.full(probs.shape[:2], 1.0 / probs.shape[1])


@pytest.mark.parametrize(
    ("helper", "wrong", "case"),
    [
        ("_text_lse", _text_lse_over_image_tokens, "bench check: discffusion, B3 on, no denoise"),
        ("_image_lse", _image_lse_over_text_tokens, "paper: image-lse, dynamic heads, all layers, B3 on"),
        ("_kept_positions", _every_position_kept, "normalize=uncond, words-eos, lambda 2"),
        ("_eq7_head_weights", _uniform_weights, "paper: image-lse, dynamic heads, all layers, B3 on"),
    ],
)
def test_a_wrong_reference_fails_the_agreement(helper, wrong, case, tiny_model, shape_images, monkeypatch):
    """Pooling over the wrong axis, ignoring the token set or the head weights is caught by the tolerance."""
    import numpy as np

    from dsdkit import reference

    monkeypatch.setattr(reference, helper, wrong)
    ours, broken, _ = _scores_and_reference(tiny_model, shape_images[:2], case)
    assert np.abs(ours - broken).max() > 20 * _tolerance(ours)


def test_reference_refuses_adapters_and_restores_the_unet_on_errors(tiny_model, shape_images):
    from types import SimpleNamespace

    from dsdkit.runtime.config import ScoringConfig
    from dsdkit.runtime.errors import ConfigError

    from dsdkit.pytorch.reference import reference_scores
    from dsdkit.pytorch.scorer import Scorer

    adapted = SimpleNamespace(model=tiny_model, config=ScoringConfig(), adapter=object())
    with pytest.raises(ConfigError, match="cannot apply a dsdkit adapter"):
        reference_scores(adapted, shape_images[:1], CAPTIONS[:1])

    def interrupted(n):
        raise KeyboardInterrupt

    unet = tiny_model.unet
    scorer = Scorer(tiny_model, ScoringConfig(num_timesteps=1))
    processors = dict(unet.attn_processors)
    with pytest.raises(KeyboardInterrupt):
        reference_scores(scorer, shape_images[:1], CAPTIONS[:1], interrupted)
    _assert_left_as_found(unet, processors)


def test_bench_refuses_to_compare_disagreeing_computations(tiny_model_dir, monkeypatch):
    """A reference that disagrees with the scorer stops the run with ParityError (exit 8), not as a bad option."""
    from dsdkit.runtime.errors import ConfigError, ParityError

    from dsdkit import reference
    from dsdkit.cli import app

    real = reference.reference_scores

    def perturbed(*args, **kwargs):
        scores = real(*args, **kwargs)
        scores[-1, -1] += 1e-3  # the untimed warm-up scores one pair, the timed run all of them
        return scores

    monkeypatch.setattr(reference, "reference_scores", perturbed)
    assert not issubclass(ParityError, ConfigError)
    result = CliRunner().invoke(
        app, ["bench", "--model", str(tiny_model_dir), "--timesteps", "1", "--images", "2", "--captions", "2"]
    )
    assert result.exit_code == ParityError.exit_code, result.output
    assert "disagree by up to 0.001 > 1e-05" in result.output
    assert "no speed ratios are reported" in result.output and "dsdkit bug" in result.output


def test_bench_cli_writes_json(tiny_model_dir, tmp_path):
    from dsdkit.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--timesteps",
            "1",
            "--images",
            "2",
            "--captions",
            "2",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "reference vs pytorch (B3 on): max abs diff" in result.output
    record = json.loads(out.read_text())
    assert record["config"]["timesteps"] == 1 and record["rows"][-1]["engine"] == "reference"


def test_bench_compiled_engine_is_checked_against_eager(tmp_path):
    from dsdkit import bench
    from dsdkit.pytorch.tiny import write_tiny_model

    micro = write_tiny_model(tmp_path / "micro", size="micro")  # the smallest graph to compile
    config = bench.BenchConfig(
        model=str(micro),
        timesteps=2,
        images=2,
        captions=2,
        batch_sizes=[4],
        engines=["pytorch", "pytorch-compiled", "reference"],
        compile_mode="default",
    )
    record = bench.run_bench(config)
    rows = {r["engine"]: r for r in record["rows"]}
    assert rows["pytorch-compiled"]["unet_evaluations"] == rows["pytorch"]["unet_evaluations"] == 2 * 2 * 2
    assert rows["pytorch-compiled"]["warm_up_s"] > 0  # the compilation, outside the timed run
    parity = record["compiled_vs_eager"]
    assert parity["ok"] and parity["max_abs_diff"] <= parity["atol"] + parity["rtol"] * 10
    assert "pytorch-compiled batch 4" in record["ratios_vs_reference"]
    assert "pytorch-compiled vs pytorch: max abs diff" in bench.format_record(record)


def test_bench_compiled_parity_gate():
    """Compiled scores outside the gate stop the run; inside it, the largest difference is reported."""
    import numpy as np
    from dsdkit.runtime.errors import ParityError

    from dsdkit import bench

    eager = np.array([[10.0, -2.0], [0.5, 3.0]])
    config = bench.BenchConfig(engines=["pytorch", "pytorch-compiled"])
    inside = {("pytorch", 4): eager, ("pytorch-compiled", 4): eager + np.array([[5e-4, 0], [0, -1e-5]])}
    assert bench._compiled_parity(inside, config)["max_abs_diff"] == pytest.approx(5e-4)
    outside = {("pytorch", 4): eager, ("pytorch-compiled", 4): eager + np.array([[0, 3e-4], [0, 0]])}  # gate 2.1e-4
    with pytest.raises(ParityError, match="torch.compile changed the computation"):
        bench._compiled_parity(outside, config)
    assert bench._compiled_parity({("pytorch", 4): eager}, config) is None
    # Not strict (the GPU kit): the failed gate is recorded with its message, and nothing is raised.
    kept = bench._compiled_parity(outside, config, strict=False)
    assert kept["ok"] is False and "torch.compile changed the computation" in kept["error"]


def test_bench_agreement_failure_is_kept_when_not_strict():
    """At half precision the fp32 agreement tolerance may fail on rounding: a kit keeps the ratios beside it."""
    import numpy as np
    from dsdkit.runtime.errors import ParityError

    from dsdkit import bench

    config = bench.BenchConfig(dtype="bf16", engines=["pytorch", "reference"])
    rows = [
        {"engine": "pytorch", "batch": 8, "pairs_per_s": 6.0},
        {"engine": "pytorch (B3 on)", "batch": 8, "pairs_per_s": 4.0},
        {"engine": "reference", "batch": 2, "pairs_per_s": 2.0},
    ]
    scores = np.array([[1.0, 2.0]])
    results = {("pytorch", 8): scores, ("pytorch (B3 on)", 8): scores, ("reference", 2): scores + 3e-3}
    with pytest.raises(ParityError, match="no speed ratios are reported"):
        bench._ratios(rows, results, config)
    kept = bench._ratios(rows, results, config, strict=False)
    assert kept["agreement"]["ok"] is False and "at bf16 this may be rounding" in kept["agreement"]["error"]
    assert kept["ratios_vs_reference"] == {"pytorch batch 8": 3.0, "pytorch (B3 on) batch 8": 2.0}


def test_bench_refuses_bundle_engines_without_a_bundle_and_unknown_modes():
    from dsdkit.runtime.errors import ConfigError

    from dsdkit.jobs.bench import BenchConfig

    with pytest.raises(ConfigError, match="engine tensorrt needs a `bundle`"):
        BenchConfig(engines=["tensorrt"]).validate()
    with pytest.raises(ConfigError, match="`compile_mode` 'turbo' is not one of"):
        BenchConfig(compile_mode="turbo").validate()


def test_bench_reports_progress_per_engine_and_row(micro_model_dir):
    from dsdkit.jobs.bench import BenchConfig, planned_rows, run_bench

    config = BenchConfig(model=str(micro_model_dir), timesteps=1, images=1, captions=2, batch_sizes=[1, 2])
    calls, statuses = [], []

    def progress(total, done):
        calls.append(("total", total, done))
        return calls.append

    record = run_bench(config, progress=progress, status=statuses.append)
    rows = [(r["engine"], r["batch"]) for r in record["rows"]]
    assert planned_rows(config) == rows and len(rows) == 5
    assert calls == [("total", 5, 0)] + [1] * 5  # one advance per measured row
    for row in record["rows"]:
        name = f"{row['engine']} batch {row['batch']}"
        mine = [s.removeprefix(f"{name}: ") for s in statuses if s.startswith(f"{name}: ")]
        done = row["unet_evaluations"]
        # Each row says when it runs (its warm-up, where it has one) and counts its UNet evaluations up to the total.
        assert mine[-1] == f"{done}/{done} UNet evals" and f"0/{done} UNet evals" in mine
        assert ("warm-up" in mine) == (row["warm_up_s"] is not None)


def test_progress_display_labels_its_times():
    from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from dsdkit.cli.ui import started_progress

    progress = started_progress("label", "status")
    try:
        columns = list(progress.columns)
        words = {
            type(columns[i]): columns[i + 1].text_format
            for i in range(len(columns) - 1)
            if isinstance(columns[i + 1], TextColumn)
        }
        assert words[TimeRemainingColumn] == "left" and words[TimeElapsedColumn] == "elapsed,"
    finally:
        progress.stop()


def test_bench_reports_adaptive_beside_exhaustive_and_the_reference(micro_model_dir):
    """One run measures exhaustive scoring, successive elimination and the reference side by side; the adaptive
    engine's evaluations are the schedule's, its exact scores are the exhaustive ones."""
    from dsdkit.runtime.adaptive import Schedule, resolve_schedule

    from dsdkit.jobs.bench import BenchConfig, format_record, run_bench

    schedule = "keep=3,k:steps=1,all"
    config = BenchConfig(
        model=str(micro_model_dir),
        timesteps=4,
        denoise=True,
        images=2,
        captions=6,
        engines=["pytorch", "pytorch-adaptive", "reference"],
        adaptive_schedule=schedule,
    )
    record = run_bench(config)
    assert [row["engine"] for row in record["rows"]] == ["pytorch", "pytorch (B3 on)", "pytorch-adaptive", "reference"]
    entry = record["adaptive"]["batches"]["8"]
    plan = resolve_schedule(Schedule.parse(schedule), 6, 4)
    assert entry["evaluations"]["conditional"] == 2 * plan.evaluations(6) == 2 * (6 * 1 + 3 * 3)
    assert entry["evaluations"]["exhaustive_conditional"] == 2 * 6 * 4
    assert entry["exact_pairs"] == 2 * 3 and entry["exact_max_abs_diff"] < 1e-5
    assert 0.0 <= entry["top1_agreement_with_exhaustive"] <= 1.0
    adaptive_row = next(r for r in record["rows"] if r["engine"] == "pytorch-adaptive")
    assert (
        adaptive_row["unet_evaluations"] == entry["evaluations"]["conditional"] + entry["evaluations"]["unconditional"]
    )
    assert "pytorch-adaptive batch 8" in record["ratios_vs_reference"]
    assert "fewer UNet evaluations" in format_record(record)
