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

    from dsdkit.attention import Recorder, scoring_processors
    from dsdkit.scorer import unet_pass

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
    z0 = torch.zeros(1, model.latent_channels, latent, latent)
    states = torch.zeros(1, 77, int(model.text_encoder.config.hidden_size))
    recorder = Recorder(scorer.layer_names, scorer.config)
    signal, noise_scale, timesteps = scorer.noising(torch.tensor([0]))
    try:
        with torch.inference_mode(), scoring_processors(model.unet, recorder):
            unet_pass(
                model, recorder, z0, signal, noise_scale, scorer.noise[:1], timesteps, states, torch.ones(1, 77), None
            )
    finally:
        for handle in handles:
            handle.remove()
    return total[0], products[0]


def test_counted_unet_flops_match_a_hand_count(tiny_model):
    from dsdkit.bench import unet_flop_counts, unet_flops
    from dsdkit.scorer import Scorer

    scorer = Scorer(tiny_model)
    counted = unet_flop_counts(scorer)
    by_hand, products_by_hand = _hand_counted_flops(scorer)
    assert counted["total"] == unet_flops(scorer) == pytest.approx(by_hand, rel=0.02)
    assert counted["attention_scores"] == pytest.approx(products_by_hand, rel=0.02)
    assert counted["total"] > counted["attention_scores"] > 1e6


def test_bench_reference_agrees_and_reports(tiny_model_dir):
    from dsdkit.bench import BenchConfig, format_record, run_bench

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


def test_bench_refuses_to_compare_disagreeing_computations(tiny_model_dir, monkeypatch):
    from dsdkit import bench
    from dsdkit.errors import ConfigError

    monkeypatch.setattr(bench, "AGREEMENT_TOLERANCE", 0.0)
    with pytest.raises(ConfigError, match="ratios would compare different computations"):
        bench.run_bench(bench.BenchConfig(model=str(tiny_model_dir), timesteps=1, images=2, captions=2))


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
    from dsdkit.tiny import write_tiny_model

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

    from dsdkit import bench
    from dsdkit.errors import ConfigError

    eager = np.array([[10.0, -2.0], [0.5, 3.0]])
    config = bench.BenchConfig(engines=["pytorch", "pytorch-compiled"])
    inside = {("pytorch", 4): eager, ("pytorch-compiled", 4): eager + np.array([[5e-4, 0], [0, -1e-5]])}
    assert bench._compiled_parity(inside, config)["max_abs_diff"] == pytest.approx(5e-4)
    outside = {("pytorch", 4): eager, ("pytorch-compiled", 4): eager + np.array([[0, 3e-4], [0, 0]])}  # gate 2.1e-4
    with pytest.raises(ConfigError, match="torch.compile changed the computation"):
        bench._compiled_parity(outside, config)
    assert bench._compiled_parity({("pytorch", 4): eager}, config) is None


def test_bench_refuses_bundle_engines_without_a_bundle_and_unknown_modes():
    from dsdkit.bench import BenchConfig
    from dsdkit.errors import ConfigError

    with pytest.raises(ConfigError, match="--engine tensorrt needs --bundle"):
        BenchConfig(engines=["tensorrt"]).validate()
    with pytest.raises(ConfigError, match="--compile-mode 'turbo' is not one of"):
        BenchConfig(compile_mode="turbo").validate()
