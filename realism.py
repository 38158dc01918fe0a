"""Are the samples brains? Two measurements that need no downloaded network.

1. A classifier two-sample test (C2ST, Lopez-Paz and Oquab 2017, "Revisiting Classifier
   Two-Sample Tests"): a small CNN is trained to tell two sets of slices apart, with k-fold
   cross-validation, and its held-out accuracy is the score: 0.5 means it cannot tell them
   apart, 1.0 that it always can. The same test on two sets of *real* slices from different
   subjects (the validation split against the test split) is the floor for the data: real
   subjects differ too, and a small set lets the classifier find some difference anyway.
2. Anatomy statistics of each set, on a foreground mask (intensity above `FOREGROUND`):
   * near-empty: under 5% of the slice is foreground;
   * one piece: the largest connected part holds at least 90% of the foreground;
   * solidity: foreground area over the area of its filled outline (holes filled);
   * symmetry: the correlation (over the whole slice) of the slice with its mirror image
     about the vertical line through the foreground's centre.

`scipy.ndimage` does the connected parts (`label`), the hole filling
(`binary_fill_holes`) and the sub-pixel shift for the mirror (`shift`): each is a
well-tested library routine where hand-written flood fills would be slow and error-prone.
"""

import numpy as np

FOREGROUND = 0.1  # intensity in [0, 1] above which a pixel is head, not background
NEAR_EMPTY = 0.05  # foreground share under which a slice counts as near-empty
ONE_PIECE = 0.9  # share of the foreground the largest part must hold
C2ST_SIZE = 64  # slices are compared at 64x64: shape and tissue, not pixel noise


# ---------------------------------------------------------------------------
# Anatomy statistics


def slice_anatomy(image):
    """Foreground share, whether in one piece, solidity and left-right symmetry of one
    (H, W) slice in [0, 1] (NaN where the slice has no foreground)."""
    from scipy import ndimage

    image = np.asarray(image, np.float64).reshape(np.shape(image)[:2])
    mask = image > FOREGROUND
    area = int(mask.sum())
    stats = {"foreground": area / mask.size, "one_piece": np.nan, "solidity": np.nan, "symmetry": np.nan}
    if area == 0:
        return stats
    labels, count = ndimage.label(mask)
    largest = np.bincount(labels.ravel())[1:].max()
    stats["one_piece"] = float(largest >= ONE_PIECE * area)
    stats["solidity"] = area / ndimage.binary_fill_holes(mask).sum()
    # Move the foreground's centre column to the middle, then compare with the mirror image.
    centre = np.nonzero(mask)[1].mean()
    offset = (image.shape[1] - 1) / 2 - centre
    centred = ndimage.shift(image, (0, offset), order=1, cval=0.0)
    if centred.std() > 0:
        stats["symmetry"] = float(np.corrcoef(centred.ravel(), centred[:, ::-1].ravel())[0, 1])
    return stats


def anatomy_statistics(images):
    """The anatomy statistics of a set of (N, H, W[, 1]) slices in [0, 1]: the share of
    near-empty slices, and over the others the share in one piece, the mean solidity and
    the mean symmetry (None where no slice has a foreground)."""
    per_slice = [slice_anatomy(image) for image in images]
    foreground = np.array([s["foreground"] for s in per_slice])
    kept = [s for s in per_slice if s["foreground"] >= NEAR_EMPTY]

    def mean(key):
        values = np.array([s[key] for s in kept], np.float64)
        return float(np.nanmean(values)) if np.isfinite(values).any() else None

    return {"near_empty": float(np.mean(foreground < NEAR_EMPTY)), "one_piece": mean("one_piece"),
            "solidity": mean("solidity"), "symmetry": mean("symmetry")}


# ---------------------------------------------------------------------------
# The classifier two-sample test


def classifier(size=C2ST_SIZE):
    """A small CNN that scores a (size, size, 1) slice: the logit of 'from the first set'."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1))
    x = inputs
    for width in (16, 32, 64):
        x = layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, layers.Dense(1)(x), name="c2st_classifier")


def downscale(images, size=C2ST_SIZE):
    import tensorflow as tf

    images = np.asarray(images, np.float32).reshape(len(images), *np.shape(images)[1:3], 1)
    return tf.image.resize(images, (size, size), method="area").numpy()


def c2st_logits(first, second, folds=5, epochs=20, batch_size=32, seed=0):
    """The held-out logits of a CNN telling (N, H, W[, 1]) slices `first` from `second`
    (above 0: "from `first`"), with `folds`-fold cross-validation: each slice is scored by
    the classifier of the fold that left it out (trained afresh in each fold; fewer folds
    for sets smaller than `folds`). The two sets are cut to the same size at random.
    Returns (logits of the picked slices of `first`, their indices in `first`, the same
    for `second`)."""
    import keras

    count = min(len(first), len(second))
    if count < 2:
        raise ValueError(f"C2ST needs at least 2 slices in each set, got {len(first)} and {len(second)}")
    folds = min(folds, count)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(len(images))[:count] for images in (first, second)]
    images = np.concatenate([downscale(np.asarray(images)[pick]) for images, pick in zip((first, second), picked)])
    labels = np.concatenate([np.ones(count), np.zeros(count)]).astype(np.float32)
    order = rng.permutation(len(images))
    # One classifier, traced once, and set back to the same fresh state before each fold:
    # the same weights, dropout seed and optimizer state a new classifier would start from.
    keras.utils.set_random_seed(seed)
    model = classifier()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    fresh = [(variable, variable.numpy()) for variable in model.variables + model.optimizer.variables]
    logits = np.zeros(len(images), np.float32)
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        keras.utils.set_random_seed(seed)
        for variable, value in fresh:
            variable.assign(value)
        model.fit(images[train], labels[train], epochs=epochs, batch_size=batch_size, verbose=0)
        logits[fold] = model(images[fold], training=False).numpy()[:, 0]
    return logits[:count], picked[0], logits[count:], picked[1]


def c2st_accuracy(first, second, folds=5, epochs=20, batch_size=32, seed=0):
    """Held-out accuracy of a CNN telling (N, H, W[, 1]) slices `first` from `second`
    (`c2st_logits`). The two sets are cut to the same size, so 0.5 is chance."""
    first_logits, _, second_logits, _ = c2st_logits(first, second, folds, epochs, batch_size, seed)
    return held_out_accuracy(first_logits, second_logits)


def held_out_accuracy(first_logits, second_logits):
    """The C2ST's accuracy from its held-out logits (`c2st_logits`): above 0 is "from the first set"."""
    return float(np.mean(np.concatenate([first_logits > 0, second_logits <= 0])))


POSITION_BINS = 5  # the C2ST by slice position: the real slices in fifths of the volume


def auroc(higher, lower):
    """P(a score of `higher` > one of `lower`), ties counting half: the AUROC (NaN if either is empty)."""
    higher, lower = np.asarray(higher)[:, None], np.asarray(lower)[None, :]
    return float(np.mean((higher > lower) + 0.5 * (higher == lower))) if higher.size and lower.size else float("nan")


def position_bins(positions):
    """{"<lo>-<hi>": which of the slice `positions` (0 the lowest slice of its volume, 1 the
    top) are in [lo, hi) (the last bin also holds 1)}, one per fifth of the volume; unknown
    (NaN) positions are in none."""
    positions = np.asarray(positions, np.float64)
    edges = np.linspace(0, 1, POSITION_BINS + 1)
    return {f"{lo:.1f}-{hi:.1f}": (positions >= lo) & ((positions < hi) | ((hi == 1) & (positions <= 1)))
            for lo, hi in zip(edges[:-1], edges[1:])}


def position_aurocs(logits, real_logits, real_positions):
    """{"<lo>-<hi>": how well the C2ST's held-out `logits` of a set tell it from the real
    slices (`real_logits`) whose position is in that fifth of the volume, as an AUROC (0.5:
    not told apart; 1: always)}: which levels of the brain give a set away."""
    return {name: auroc(logits, real_logits[inside]) for name, inside in position_bins(real_positions).items()}


def realism_metrics(samples, real, control, seed=0, epochs=20, real_positions=None):
    """Samples against real slices, with the real-vs-real control: C2ST accuracies and the
    anatomy statistics of each set, as one flat dict for metrics.json. With the real slices'
    positions (any known), also each set's AUROC against each fifth of the volume
    (`position_aurocs`; "c2st_<samples|control>_auroc_<lo>-<hi>")."""
    metrics = {"c2st_slices": int(min(len(samples), len(real)))}
    positions = None if real_positions is None else np.asarray(real_positions, np.float64)
    known = positions is not None and np.isfinite(positions).any()
    for name, images in (("samples_vs_real", samples), ("real_vs_real", control)):
        logits, _, real_logits, real_picked = c2st_logits(images, real, seed=seed, epochs=epochs)
        metrics[f"c2st_{name}"] = held_out_accuracy(logits, real_logits)
        if known:
            who = "samples" if name == "samples_vs_real" else "control"
            aurocs = position_aurocs(logits, real_logits, positions[real_picked])
            metrics.update({f"c2st_{who}_auroc_{bin_name}": value for bin_name, value in aurocs.items()
                            if np.isfinite(value)})  # a fifth with no real slices has none
    for name, images in (("samples", samples), ("real", real)):
        metrics.update({f"{name}_{key}": value for key, value in anatomy_statistics(images).items()})
    return metrics
