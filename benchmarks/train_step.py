"""Seconds per training step (one example per step) on the CPU, for the tiny and the full-size SD2 architecture.

    python benchmarks/train_step.py --size full --candidates 2 --steps 2

Each step: one example (one image, ``--candidates`` captions sharing one timestep and one noise), one UNet forward
over the candidates, the loss, one backward into the adapter and one AdamW update: exactly the trainer's step.
Writes ``benchmarks/results/train_step-<size>-<adapter>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["micro", "tiny", "full"])
    parser.add_argument("--model", help="model folder (default: a random-weight model of --size in a temp dir)")
    parser.add_argument("--adapter", default="kv-prompt", choices=["kv-prompt", "lora"])
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import torch
    from dsdkit.train import TrainConfig, Trainer

    from dsdkit.pytorch.tiny import write_tiny_model
    from dsdkit.world import write_colour_shapes

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = args.model or write_tiny_model(scratch / "model", size=args.size)
        source = write_colour_shapes(scratch / "data", train=args.steps + 1, test=0)
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        data = scratch / "data" / "bench.jsonl"
        data.write_text(
            "".join(
                json.dumps(
                    {
                        **r,
                        "captions": r["captions"][: args.candidates],
                        "positive": min(r["positive"], args.candidates - 1),
                    }
                )
                + "\n"
                for r in rows
            )
        )
        config = TrainConfig(
            data=str(data),
            output=str(scratch / "run"),
            model=str(folder),
            adapter=args.adapter,
            scoring={"denoise_term": False},
            eval_every_epoch=False,
            device="cpu",
            gradient_checkpointing=args.gradient_checkpointing,
        )
        trainer = Trainer(config)
        trainer.setup()
        examples = trainer.train_examples
        samples = []
        trainer.encoder.encode_images([p for e in examples for p in e.images])  # per-image work is cached
        trainer.encoder.encode_texts(examples[0].texts)
        for index, example in enumerate(examples):
            start = time.perf_counter()
            trainer._step([example])
            if index > 0:
                samples.append(time.perf_counter() - start)
        model = trainer.model
        record = {
            "benchmark": "train_step",
            "date": datetime.date.today().isoformat(),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "device": "cpu",
            },
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
            "model": {
                "size": args.size if not args.model else "given",
                "resolution": model.resolution,
                "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
            },
            "adapter": args.adapter,
            "adapter_parameters": trainer.adapter.num_parameters(),
            "candidates_per_example": args.candidates,
            "gradient_checkpointing": args.gradient_checkpointing,
            "step_s_median": statistics.median(samples),
            "step_s_samples": samples,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_step-{record['model']['size']}-{args.adapter}-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(
        json.dumps(
            {k: record[k] for k in ("step_s_median", "adapter_parameters", "candidates_per_example", "peak_rss_gb")},
            indent=1,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
