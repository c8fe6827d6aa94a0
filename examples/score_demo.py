"""Score images against captions with dsdkit's Python API: the shipped demo model, on the CPU, offline.

    pip install -e ".[torch]"          # from a checkout
    python examples/score_demo.py [IMAGES_DIR] [CAPTIONS_TXT]

Defaults: the demo world's eight example images and captions (examples/demo/). For SD2, pass a diffusers SD2 folder
or hub id to load_model instead of "demo" (and device="cuda" on a GPU).
"""

import sys
from pathlib import Path

import dsdkit  # first: dsdkit sets passive waiting for torch's threads before torch loads

here = Path(__file__).parent
folder = Path(sys.argv[1] if len(sys.argv) > 1 else here / "demo")
images = sorted(folder.glob("*.png"))
captions = Path(sys.argv[2] if len(sys.argv) > 2 else folder / "captions.txt").read_text().splitlines()

model = dsdkit.load_model("demo", device="cpu")
# S = 10 timesteps of the discffusion table: fewer are faster and a little noisier (the default is 30). The config is
# the one `dsdkit match --model demo --timesteps 10` runs: the demo model declares its score (the denoising term
# alone; attention_term=True for the method's score with both terms).
scorer = dsdkit.Scorer(model, model.scoring_config(num_timesteps=10))

result = scorer.score_matrix(images, captions)  # per-timestep terms and the scores they make
for image, row in zip(images, result.scores, strict=True):
    best = row.argmax()
    print(f"{image.name}: {captions[best]!r} ({row[best]:.4f})")

# Ranking: the best captions for one image, and the best images for one caption (scores are comparable within one
# image; to compare images for a caption, subtract each image's empty-caption score: normalize="uncond").
print("best captions for", images[0].name, [caption for caption, _ in scorer.rank_texts(images[0], captions)[:3]])
uncond = dsdkit.Scorer(model, scorer.config.replace(normalize="uncond"))
index, score = uncond.rank_images(captions[0], images)[0]
print(f"best image for {captions[0]!r}: {images[index].name}")
