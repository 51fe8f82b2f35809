"""Build the README's demo scenario in assets/examples/: the demo model's misdrawn flag of Chad
(seed 40: the red stripe comes out purple) and a painted surrogate with the stripe painted red.

    python scripts/make_demo_example.py
"""

from pathlib import Path

import numpy as np
from PIL import Image

from unlearn_core.models import load_model

PROMPT, SEED = "flag of chad", 40
CHAD_RED = np.array([198, 12, 48], dtype=np.float32)


def paint_purple_red(image: Image.Image) -> Image.Image:
    """Repaint purple pixels (red and blue both high, green low) in Chad's red, keeping their shading."""
    array = np.asarray(image, dtype=np.float32)
    r, g, b = array[..., 0], array[..., 1], array[..., 2]
    purple = (b > 90) & (r > 70) & (g < 90) & (b > g + 40)
    brightness = array.max(axis=-1, keepdims=True) / CHAD_RED.max()
    painted = np.where(purple[..., None], np.clip(CHAD_RED * brightness, 0, 255), array)
    return Image.fromarray(painted.round().astype(np.uint8))


def main() -> None:
    out = Path("assets/examples")
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("assets/demo-model", "cpu")
    target = model.generate(PROMPT, [SEED], 25, 5.0)[0][0]
    target.save(out / "chad_seed40_target.png")
    paint_purple_red(target).save(out / "chad_seed40_surrogate.png")
    print(f"wrote {out}/chad_seed40_target.png and chad_seed40_surrogate.png")


if __name__ == "__main__":
    main()
