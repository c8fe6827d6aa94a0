"""Embed dsdkit's runtime in your own program: no torch, only numpy, Pillow, tokenizers and onnxruntime.

    pip install -e ".[ort]"            # from a checkout; ".[ort-gpu]" on a CUDA machine (never both)
    python examples/embed_runtime.py BUNDLE [IMAGES_DIR] [CAPTIONS_TXT]

BUNDLE comes from `dsdkit export`. Defaults: this folder's images and captions.
"""

import sys
from pathlib import Path

from dsdkit.runtime import Bundle, Matcher

here = Path(__file__).parent
bundle = sys.argv[1]
images = sorted(Path(sys.argv[2] if len(sys.argv) > 2 else here / "images").glob("*.png"))
captions = Path(sys.argv[3] if len(sys.argv) > 3 else here / "captions.txt").read_text().splitlines()

# S (num_timesteps) sizes the discffusion timestep table only: fewer timesteps are faster and a little noisier. A
# bundle exported at the noise-levels schedule scores at the levels its adapter was trained with, so it keeps them.
schedule = Bundle.open(bundle, verify=False).scoring["timesteps"]  # the manifest only; from_bundle verifies
options = {"num_timesteps": 4} if schedule == "discffusion" else {}

with Matcher.from_bundle(bundle, **options) as matcher:
    scores = matcher.score(images, captions)  # numpy [len(images), len(captions)], higher = better match
    for image, row in zip(images, scores, strict=True):
        print(f"{image.name}: {captions[row.argmax()]!r} ({row.max():.4f})")
    best = matcher.rank_images(captions[0], images)[0]  # (index, score), best first
    print(f"best image for {captions[0]!r}: {images[best[0]].name}")
