"""Bundles exported once per test session (the TorchScript exporter keeps each tiny export to seconds; one case uses
the default dynamo exporter through the CLI)."""

from __future__ import annotations

import pytest


def perturbed_adapter(model, scoring, kind: str, seed: int = 0, scale: float = 0.05):
    """An adapter of ``kind`` with every parameter random and non-zero, as after training."""
    import torch

    from dsdkit.adapters import AdapterConfig, create_adapter

    adapter = create_adapter(model, scoring, AdapterConfig(kind=kind, init_seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return adapter


@pytest.fixture(scope="session")
def adapter_files(tiny_model, tmp_path_factory):
    """Trained-looking kv-prompt (discffusion config) and LoRA (paper config) adapter files."""
    from dsdkit.adapters import save_adapter
    from dsdkit.config import ScoringConfig

    folder = tmp_path_factory.mktemp("adapters")
    files = {}
    for kind, preset in (("kv-prompt", "discffusion"), ("lora", "paper")):
        scoring = ScoringConfig.from_preset(preset)
        adapter = perturbed_adapter(tiny_model, scoring, kind)
        files[kind] = save_adapter(adapter, folder / f"{kind}.safetensors", tiny_model.identity(), scoring)
    return files


@pytest.fixture(scope="session")
def export_case(tiny_model_dir, adapter_files, tmp_path_factory):
    """``export_case(name)`` -> (bundle path, manifest), exported at most once per session."""
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle

    cases = {
        "discffusion-kv-prompt": dict(adapters=adapter_files["kv-prompt"], config={}),
        "paper-lora": dict(adapters=adapter_files["lora"], preset="paper", config={}),
        "discffusion-fp16": dict(config={"precision": "fp16"}),
    }
    done = {}

    def get(name):
        if name not in done:
            case = dict(cases[name])
            config = ExportConfig(exporter="torchscript", parity=ParitySettings(images=3, captions=3, timesteps=2),
                                  **case.pop("config"))
            out = tmp_path_factory.mktemp("bundles") / name
            manifest = export_bundle(tiny_model_dir, out, config=config, **case)
            done[name] = (out, manifest)
        return done[name]

    return get
