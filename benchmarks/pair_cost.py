"""Cost of one DSD pair score and the scorer's overhead over a plain UNet forward.

    python benchmarks/pair_cost.py --size full --timesteps 30 [--model DIR] [--repeats 3]

Measured in one run, same process, same inputs:
- ``unet_plain_s``: a UNet forward at batch 1 with diffusers' default attention processors (SDPA);
- ``unet_scoring_s``: the scorer's UNet pass at batch 1 (explicit fp32 cross-attention on the scored layers, pooling);
- ``pair_score_s``: one image x one caption from files to score with the given preset and S (VAE, text encoder,
  S unconditional + S conditional UNet passes when the denoising term is on).
Writes ``benchmarks/results/pair_cost-<size>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py (scripts run from their folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder; default: write a random-weight model of --size to a temp dir")
    parser.add_argument("--size", default="full", choices=["micro", "tiny", "full"])
    parser.add_argument("--preset", default="discffusion")
    parser.add_argument("--timesteps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from dsdkit import Scorer, ScoringConfig, load_model
    from dsdkit.pytorch.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or write_tiny_model(Path(scratch) / "model", size=args.size)
        model = load_model(folder, device="cpu", dtype="fp32")
        config = ScoringConfig.from_preset(args.preset, num_timesteps=args.timesteps)
        scorer = Scorer(model, config, batch_size=1)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (model.resolution, model.resolution, 3), dtype=np.uint8)
        caption = "a red circle next to a blue square"

        latent = scorer.encode_images([image])[0].latent[None]  # z0 of the one image
        text = scorer.encode_texts([caption])[0]
        steps = torch.tensor([len(scorer.timesteps) // 2])
        x_t = (
            scorer._signal[steps].view(-1, 1, 1, 1) * latent
            + scorer._noise_scale[steps].view(-1, 1, 1, 1) * scorer.noise[steps]
        )
        t = scorer._timestep_tensor[steps]

        def timed(fn):
            fn()  # warm-up
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            return statistics.median(samples), samples

        with torch.inference_mode():
            plain, plain_all = timed(lambda: model.unet(x_t, t, encoder_hidden_states=text.states[None]))
            step_index = steps.numpy()
            encoded, texts = scorer.encode_images([image]), [text]
            scoring, scoring_all = timed(lambda: scorer._evaluate(encoded, texts, step_index))

        fresh = Scorer(model, config, batch_size=1)
        start = time.perf_counter()
        output = fresh.score_matrix([image], [caption])
        pair_seconds = time.perf_counter() - start

    record = {
        "benchmark": "pair_cost",
        "date": datetime.date.today().isoformat(),
        "machine": machine(torch_threads=torch.get_num_threads(), device="cpu"),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "model": {
            "size": args.size if not args.model else "given",
            "resolution": model.resolution,
            "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
        },
        "precision": "fp32",
        "scoring": config.to_dict(),
        "unet_plain_s": plain,
        "unet_plain_samples_s": plain_all,
        "unet_scoring_s": scoring,
        "unet_scoring_samples_s": scoring_all,
        "scoring_overhead_ratio": scoring / plain,
        "pair_score_s": pair_seconds,
        "pair_unet_evaluations": output.unet_evaluations,
        "pair_score_per_unet_evaluation_s": pair_seconds / output.unet_evaluations,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pair_cost-{record['model']['size']}-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: record[k]
                for k in (
                    "unet_plain_s",
                    "unet_scoring_s",
                    "scoring_overhead_ratio",
                    "pair_score_s",
                    "pair_unet_evaluations",
                    "peak_rss_gb",
                )
            },
            indent=1,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
