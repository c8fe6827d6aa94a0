"""Pairs per second: the torch-free runtime (ONNX Runtime on a bundle) vs the PyTorch scorer, same job, one run.

    python benchmarks/runtime_throughput.py --size tiny --images 8 --captions 8 --timesteps 4
    python benchmarks/runtime_throughput.py --model SD2_DIR --bundle BUNDLE --images 1 --captions 2 --timesteps 1

Both engines score the same generated images against the same captions from scratch (nothing cached), with the
bundle's scoring config and the same batch size; wall time includes image and caption encoding. Without
``--bundle`` a bundle is exported first (TorchScript exporter; not timed). Writes
``benchmarks/results/runtime_throughput-<size>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py (scripts run from their folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder; default: write a random-weight model of --size")
    parser.add_argument("--bundle", help="bundle of that model; default: export one (TorchScript exporter)")
    parser.add_argument("--size", default="tiny", choices=["micro", "tiny", "full"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--captions", type=int, default=8)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime
    import torch
    from dsdkit.export import ExportConfig, ParitySettings, export_bundle
    from dsdkit.export.parity import parity_inputs
    from dsdkit.runtime import Matcher
    from dsdkit.runtime.config import ScoringConfig

    from dsdkit import __version__
    from dsdkit.pytorch.models import load_model
    from dsdkit.pytorch.scorer import Scorer
    from dsdkit.pytorch.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or write_tiny_model(Path(scratch) / "model", size=args.size)
        bundle = args.bundle
        if bundle is None:
            bundle = Path(scratch) / "bundle"
            export_bundle(
                folder,
                bundle,
                config=ExportConfig(exporter="torchscript", parity=ParitySettings(images=2, captions=2)),
            )
        images, captions = parity_inputs(ParitySettings(images=args.images, captions=args.captions, seed=1))
        pairs = args.images * args.captions

        started = time.perf_counter()
        matcher = Matcher.from_bundle(bundle, num_timesteps=args.timesteps, batch_size=args.batch_size)
        matcher.runners["scorer"].activate()
        setup_runtime = time.perf_counter() - started
        started = time.perf_counter()
        ours = matcher.score(images, captions)
        runtime_s = time.perf_counter() - started
        scoring = matcher.config.to_dict()
        evaluations = matcher.planned_evaluations(args.images, args.images * args.captions)
        matcher.close()

        started = time.perf_counter()
        model = load_model(folder, device="cpu", dtype="fp32")
        scorer = Scorer(
            model, ScoringConfig.from_dict({**scoring, "num_timesteps": args.timesteps}), batch_size=args.batch_size
        )
        setup_torch = time.perf_counter() - started
        started = time.perf_counter()
        theirs = scorer.score(images, captions)
        torch_s = time.perf_counter() - started

    record = {
        "benchmark": "runtime_throughput",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": {"dsdkit": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "model": f"random-weight {args.size}" if args.model is None else f"{args.size}: {Path(args.model).name}",
        "job": {
            "images": args.images,
            "captions": args.captions,
            "pairs": pairs,
            "timesteps": args.timesteps,
            "batch_size": args.batch_size,
            "unet_evaluations": evaluations,
            "preset": scoring["preset"],
            "denoise_term": scoring["denoise_term"],
        },
        "runtime_onnxruntime": {
            "seconds": round(runtime_s, 3),
            "pairs_per_s": round(pairs / runtime_s, 4),
            "evaluations_per_s": round(evaluations / runtime_s, 3),
            "setup_s": round(setup_runtime, 2),
        },
        "pytorch": {
            "seconds": round(torch_s, 3),
            "pairs_per_s": round(pairs / torch_s, 4),
            "evaluations_per_s": round(evaluations / torch_s, 3),
            "setup_s": round(setup_torch, 2),
        },
        "ratio_runtime_over_pytorch": round(torch_s / runtime_s, 3),
        "max_abs_diff": float(np.abs(ours - theirs).max()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"runtime_throughput-{args.size}-{record['date']}.json"  # --size labels a --model run too
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
