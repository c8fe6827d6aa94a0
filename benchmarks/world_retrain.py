"""Retrain the demo world model with the shipped recipe and compare its accuracy with the shipped model's.

    python benchmarks/world_retrain.py RUN_DIR -o benchmarks/results/world-retrain-DATE.json [--threads 2]

Trains ``dsdkit.train.world.WorldRecipe()`` (the recipe in ``dsdkit/assets/demo/world_model.json``) into
``RUN_DIR`` (resumable: rerun the same command after an interruption), then scores the same fresh benchmark items
(S = 10, the default score, 200 per subset) with the retrained and the shipped model. Pin ``--threads`` and run
nothing else heavy beside it: training time is part of the record. Takes about an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--items", type=int, default=200)
    args = parser.parse_args()

    from dsdkit.runtime.files import atomic_write_text
    from dsdkit.train.world import WorldRecipe, measure_world_model, train_world_model

    from dsdkit.world.demo import demo_model_folder

    started = time.perf_counter()
    folder = train_world_model(
        args.run, WorldRecipe(), resume=(args.run / "recipe.json").is_file(), threads=args.threads
    )
    train_s = time.perf_counter() - started
    retrained = measure_world_model(folder, per_subset=args.items)
    shipped = measure_world_model(demo_model_folder(), per_subset=args.items)
    info = json.loads((folder / "world_model.json").read_text(encoding="utf-8"))
    record = {
        "benchmark": "world-retrain",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "train_wall_s_this_process": round(train_s, 1),
        "training": info["training"],
        "retrained": retrained,
        "shipped": shipped,
    }
    atomic_write_text(args.output, json.dumps(record, indent=1) + "\n")
    for subset in retrained["zero_shot_accuracy"]:
        print(
            f"{subset:10s} retrained {retrained['zero_shot_accuracy'][subset]:.3f}  "
            f"shipped {shipped['zero_shot_accuracy'][subset]:.3f}"
        )


if __name__ == "__main__":
    main()
