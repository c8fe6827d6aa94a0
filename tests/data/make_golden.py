"""Regenerate the golden score matrices and the format fixtures of ``tests/test_golden.py``.

Run from the repository root::

    python tests/data/make_golden.py

It writes, under ``tests/data/``:

- ``golden-pytorch.npz``: the score matrices of one fixed job (3 demo images x 3 demo captions on the seeded
  ``tiny`` test model) under both presets with and without the denoising term, and with a trained kv-prompt and a
  trained LoRA adapter;
- ``golden-bundle.npz``: the same job on an ONNX Runtime bundle of the kv-prompt adapter (torchscript exporter);
- ``formats/``: files in the formats of the day they were written: the two adapters, that bundle's manifest and
  the ``.partial`` state of an interrupted ``match`` run (``tests/test_golden.py`` checks that they still load);
- ``golden.json``: the versions and this command.

Everything is a pure function of the seeds and the library versions recorded in ``golden.json``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
FORMATS = DATA / "formats"
IMAGES = [ROOT / "examples" / "demo" / name for name in ("00-a-red-circle.png", "01-a-blue-square.png")] + [
    ROOT / "examples" / "demo" / "05-a-red-square-left-of-a-blue-triangle.png"
]
CAPTIONS = ["a red circle", "a blue square", "a red square left of a blue triangle"]
NUM_TIMESTEPS = 4
COMMAND = "python tests/data/make_golden.py"
# fp32 convolutions sum in an order that depends on the thread count (differences of ~1e-6 on these scores), so the
# recording and the test both run with this many torch threads.
THREADS = 2

# name -> (preset, knob overrides, adapter kind or None)
JOBS = {
    "discffusion": ("discffusion", {"num_timesteps": NUM_TIMESTEPS}, None),
    "discffusion-no-denoise": ("discffusion", {"num_timesteps": NUM_TIMESTEPS, "denoise_term": False}, None),
    "paper": ("paper", {}, None),
    "paper-denoise": ("paper", {"denoise_term": True}, None),
    "kv-prompt": (None, {"num_timesteps": NUM_TIMESTEPS}, "kv-prompt"),
    "lora": (None, {}, "lora"),
}


def versions() -> dict:
    import diffusers
    import onnxruntime
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
    }


def train_adapter(kind: str, preset: str, model_dir: Path, work: Path) -> Path:
    """A few real optimizer steps of ``dsdkit train`` on the colour-shape task, so the adapter is non-trivial."""
    data = work / "data"
    if not data.exists():
        subprocess.run(
            [sys.executable, "-m", "dsdkit", "tiny-data", str(data), "--train", "8", "--test", "4"], check=True
        )
    run = work / f"run-{kind}"
    command = [sys.executable, "-m", "dsdkit", "train", str(data / "data.jsonl"), "--model", str(model_dir)]
    command += ["--adapter", kind, "--preset", preset, "--max-steps", "3", "--lr", "0.05", "--no-eval", "-o", str(run)]
    if preset == "discffusion":
        command += ["--timesteps", str(NUM_TIMESTEPS)]
    subprocess.run(command, check=True)
    return run / "adapter.safetensors"


def write_partial(model, work: Path) -> None:
    """Interrupt a chunked ``match`` after its first chunk and keep its ``.partial`` folder."""
    from dsdkit.runtime.config import ScoringConfig
    from dsdkit.runtime.images import load_image

    from dsdkit.jobs.match import match

    class Interrupted(Exception):
        pass

    images = [np.asarray(load_image(p)) for p in IMAGES]
    per_chunk = NUM_TIMESTEPS * (1 + len(CAPTIONS))

    def progress(total, done):
        seen = [0]

        def advance(n):
            seen[0] += n
            if seen[0] > per_chunk:
                raise Interrupted

        return advance

    output = work / "partial" / "scores.csv"
    output.parent.mkdir()
    try:
        match(
            images,
            CAPTIONS,
            model=model,
            config=ScoringConfig.from_preset("discffusion", num_timesteps=NUM_TIMESTEPS),
            output=output,
            chunk_size=1,
            progress=progress,
        )
    except Interrupted:
        pass
    shutil.copytree(output.with_name("scores.csv.partial"), FORMATS / "scores.csv.partial")


def main() -> None:
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle
    from dsdkit.runtime.config import ScoringConfig
    from dsdkit.runtime.matcher import Matcher

    from dsdkit.pytorch.adapters import load_adapter
    from dsdkit.pytorch.models import load_model
    from dsdkit.pytorch.scorer import Scorer
    from dsdkit.pytorch.tiny import write_tiny_model

    torch.set_num_threads(THREADS)

    shutil.rmtree(FORMATS, ignore_errors=True)
    FORMATS.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model_dir = write_tiny_model(work / "tiny", size="tiny", seed=0)
        model = load_model(model_dir, device="cpu", dtype="fp32")
        adapters = {
            "kv-prompt": train_adapter("kv-prompt", "discffusion", model_dir, work),
            "lora": train_adapter("lora", "paper", model_dir, work),
        }
        for kind, path in adapters.items():
            shutil.copy(path, FORMATS / f"{kind}.safetensors")
        matrices = {}
        for name, (preset, overrides, kind) in JOBS.items():
            if kind is None:
                config, adapter = ScoringConfig.from_preset(preset, **overrides), None
            else:
                adapter, trained = load_adapter(FORMATS / f"{kind}.safetensors", model)
                config = trained.replace(**overrides)
            scorer = Scorer(model, config, batch_size=5, adapter=adapter)
            matrices[name] = scorer.score([str(p) for p in IMAGES], CAPTIONS)
            matrices[f"{name}.config"] = np.array(config.to_json())
        np.savez(DATA / "golden-pytorch.npz", **matrices)

        export = ExportConfig(
            exporter="torchscript", noise_bank_size=8, parity=ParitySettings(images=2, captions=2, timesteps=2)
        )
        bundle = work / "bundle-kv-prompt"
        manifest = export_bundle(model_dir, bundle, adapters=FORMATS / "kv-prompt.safetensors", config=export)
        # The graphs are tens of MB: only the manifest is kept; the test re-exports the graphs and checks both.
        shutil.copy(bundle / "manifest.json", FORMATS / "bundle-kv-prompt.manifest.json")
        with Matcher.from_bundle(bundle, backend="onnxruntime", device="cpu", num_timesteps=NUM_TIMESTEPS) as m:
            ort = m.score([str(p) for p in IMAGES], CAPTIONS)
        np.savez(DATA / "golden-bundle.npz", scores=ort, tolerance=np.array(json.dumps(manifest["parity"])))
        write_partial(model, work)

    record = {
        "command": COMMAND,
        "versions": versions(),
        "model": {"size": "tiny", "seed": 0},
        "threads": THREADS,
        "images": [p.relative_to(ROOT).as_posix() for p in IMAGES],
        "captions": CAPTIONS,
        "jobs": {name: {"preset": p, "overrides": o, "adapter": k} for name, (p, o, k) in JOBS.items()},
        "bundle": {
            "exporter": "torchscript",
            "adapter": "kv-prompt",
            "backend": "onnxruntime",
            "noise_bank_size": 8,
            "parity": {"images": 2, "captions": 2, "timesteps": 2},
        },
    }
    (DATA / "golden.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {DATA}/golden-*.npz, golden.json and formats/")


if __name__ == "__main__":
    main()
