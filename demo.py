"""The built-in demo dataset: synthetic axial T1-like brain slices in the OASIS layout,
generated in seconds from a seed, so `python driver.py` runs with no data at all.

Its own module because `data.py` reads real data; this only makes some.
"""

import os

import numpy as np
import tensorflow as tf

from data import OASIS_DIRS, SPLITS


def _blur(image, passes=2):
    """A cheap separable [1, 2, 1] blur, so tissue boundaries are soft as in a real scan."""
    for _ in range(passes):
        image = np.pad(image, 1, mode="edge")
        image = (image[:-2] + 2 * image[1:-1] + image[2:]) / 4
        image = (image[:, :-2] + 2 * image[:, 1:-1] + image[:, 2:]) / 4
    return image


def synthetic_brain_slice(size, rng):
    """One synthetic axial T1-like brain slice in [0, 1].

    Scalp and skull, a CSF rim, folded grey matter over white matter, two lateral
    ventricles and a midline fissure; shape, contrast, bias field and noise vary per call."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    angle = rng.uniform(-0.15, 0.15)
    xr = x * np.cos(angle) + y * np.sin(angle) - rng.uniform(-0.05, 0.05)
    yr = -x * np.sin(angle) + y * np.cos(angle) - rng.uniform(-0.05, 0.05)
    a, b = rng.uniform(0.66, 0.80), rng.uniform(0.80, 0.92)
    r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    theta = np.arctan2(yr, xr)

    contrast = {
        "scalp": rng.uniform(0.55, 0.75),
        "skull": rng.uniform(0.05, 0.15),
        "csf": rng.uniform(0.08, 0.2),
        "grey": rng.uniform(0.4, 0.5),
        "white": rng.uniform(0.68, 0.82),
    }
    image = np.zeros_like(x)
    image[r < 1.0] = contrast["scalp"]
    image[r < 0.94] = contrast["skull"]
    image[r < 0.88] = contrast["csf"]
    folds = rng.integers(9, 16)
    cortex = 0.84 + 0.025 * np.sin(folds * theta + rng.uniform(0, 2 * np.pi))
    image[r < cortex] = contrast["grey"]
    white = 0.66 + 0.06 * np.sin(folds * theta + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.6, 1.2)
    image[r < white] = contrast["white"]

    fissure = (np.abs(xr) < 0.012 * size / 64) & (yr < -0.25 * b) & (r < 0.88)
    image[fissure] = contrast["csf"]
    spread, length, width = rng.uniform(0.07, 0.14), rng.uniform(0.18, 0.32), rng.uniform(0.05, 0.1)
    for side in (-1, 1):
        vx = (xr - side * spread) / width
        vy = (yr + rng.uniform(-0.05, 0.05)) / length
        image[vx**2 + vy**2 < 1] = contrast["csf"]

    bias = 1 + 0.1 * (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y)
    image = _blur(image) * bias
    image = image + rng.normal(0, rng.uniform(0.003, 0.01), image.shape) * (r < 1.02)
    return np.clip(image, 0, 1).astype(np.float32)


def write_demo_dataset(root, size=128, counts=(320, 64, 64), slices_per_case=16, seed=0):
    """Write the demo dataset in the OASIS layout (PNG) and return `root`.

    Deterministic for a given size, counts and seed; a folder already written with the same
    settings is reused."""
    stamp = os.path.join(root, "demo.json")
    settings = f'{{"size": {size}, "counts": {list(counts)}, "seed": {seed}}}'
    if os.path.exists(stamp) and open(stamp).read() == settings:
        return root
    rng = np.random.default_rng(seed)
    case = 0
    for split, count in zip(SPLITS, counts):
        folder = os.path.join(root, OASIS_DIRS[split])
        os.makedirs(folder, exist_ok=True)
        for index in range(count):
            if index % slices_per_case == 0:
                case += 1
            image = synthetic_brain_slice(size, rng)
            png = tf.io.encode_png(np.round(image * 255).astype(np.uint8)[..., None])
            tf.io.write_file(os.path.join(folder, f"case_{case:03d}_slice_{index % slices_per_case}.nii.png"), png)
    with open(stamp, "w") as f:
        f.write(settings)
    return root
