"""Anomaly maps: where a slice departs from what a model of healthy brains has learnt.

A VQ-VAE reconstructs a lesion as faithfully as the rest of a slice, so its reconstruction
error marks edges, not lesions. Its prior does know what healthy code grids look like. So,
as in Pinaya et al. 2022 (Medical Image Analysis) and MONAI's generative tutorials:

1. encode the slice and score every code's likelihood under the prior in one parallel pass
   (the prior gives all conditional logits of a grid at once; for the hierarchical prior,
   each level's: the top grid's codes, then the codes given the top grid; a top level that
   knows slice positions scores a slice at the position under which it is likeliest);
2. compare each code's negative log-likelihood (NLL) with what healthy codes score at the
   same place of the grid: a z-score against the mean and spread of that position's NLL
   over the run's validation split (`reference`); some places (the head's edge, the skull
   base) are hard to predict in every slice, and a global threshold marks them first;
3. "heal" the slice: redraw the codes whose z-score is above a high quantile of the
   validation's, and their neighbours, from the prior, each given every code before it
   (kept or redrawn), with the exact cached sampler (`pixelcnn.Sampler(fixed, keep)`),
   several times; top codes first, then every code of a block whose top code changed;
   decode each healed grid and average them;
4. the map. "likelihood": the coarsest level's z-scores (the top grid's, for the
   hierarchical prior), spread over the pixels each code stands for, averaged with those of
   the slice's mirror image (mirrored back) when the prior learnt mirrored slices too, above
   zero and smoothed. It knows which 16-pixel blocks are unusual, not which pixels. The
   default ("asymmetry") asks how the slice departs from what healthy tissue would look like
   there (`healthy_estimate`): its own mirror image, turned, moved (`mirror_transform`) and
   bent (`mirror_field`) onto it (brains are nearly left-right symmetric, most lesions are
   not), and the healthy heads most like it (`Atlas`: the run's healthy training slices,
   decoded from their code grids, stretched onto its head and bent onto it), mixed at each
   place with the weights and offset that fit the slice best over a window wider than a
   lesion, so that a brighter half, another contrast or a better-matching head is followed
   and a lesion is not. The map is |smoothed slice - smoothed estimate| over how much their
   fine detail still differs around it (`fine_mismatch`: where sulci do not quite meet, a
   difference means less), times the square root of a side share: which side of an
   asymmetry is the lesion's, and which its healthy mirror place. Two judges give it, as a
   geometric mean (weights 0.3 and 0.7): the likelihood map's `side_share` (its value at
   each place over the sum of its values there and at the mirror place: the side the prior
   finds less likely) and the same share of the atlas deviation (|slice - the healthy
   heads' mean|: the side that differs more from them). Last, the map fades in over the
   head's outer centimetre (`depth`: scalp and skull). Neither cue alone finds lesions well:
   the asymmetry also marks a lesion's mirror place, the likelihood map whole blocks of
   healthy tissue, the atlas every way one head differs from another; together they are
   several times as precise as the likelihood map on synthetic lesions
   (`benchmarks/anomaly.py`, README). A lesion on the midline that is itself
   symmetric is invisible to the asymmetry. "healing" is Pinaya et al.'s map: the difference
   between the slice and its healed version, only where healing changed codes, smoothed.
   A slice's score is how far its map's 99.9th percentile (what its brightest small region
   reaches) stands above its 99th (`slice_scores`).

`driver.py anomaly` runs this on a folder of files (`write_maps`); `benchmarks/anomaly.py`
measures it against the reconstruction residual on slices with synthetic lesions.
"""

import os

import numpy as np
import tensorflow as tf
from scipy import ndimage

import hierarchy
from realism import FOREGROUND  # a slice's head: pixels above this (of [0, 1]); maps are zero outside it

DRAWS = 4  # healed versions averaged per slice
BATCH = 16  # slices mapped at once (32 was faster on some inputs, slower on others, and needs 7 GB, not 4)
QUANTILE = 0.995  # of the validation split's per-code z-scores: codes above it (and their neighbours) are redrawn
SPREAD_FLOOR = 0.5  # nats added to each grid position's NLL spread, so that a position healthy codes always
# predict perfectly (the background) does not turn a tiny difference into a huge z-score
REFERENCE_VERSION = 2  # of how `reference` scores codes; a saved reference of another version is made again
MAPS = ("asymmetry", "likelihood", "healing")  # what `anomaly_maps` returns as the map; the first is the default
SMOOTHING = 2.0  # Gaussian sigma of the healing map, in pixels; the likelihood map's is a quarter of a code's block
SYMMETRY_SMOOTHING = 6 / 256  # Gaussian sigma of the slice and its mirror image before they are compared, in widths
SIDEWAYS = 0.9  # `mirror_transform`: a head is taken as lying on its side when its top-to-bottom mirror image differs
# from it by less than this share of what its left-to-right one does (real upright heads: 1.05 and more)
BEND_STEPS = 100  # demons steps of `mirror_field`, on a 2x smaller slice
ATLAS_BEND_STEPS = 50  # demons steps that bend an `Atlas` head onto a slice (as good as 100 there, and half the time)
BEND_BLUR = 3 / 256  # Gaussian sigma of the slice and its mirror image before `mirror_field` compares them, in widths
BEND_SMOOTHING = 4 / 256  # Gaussian sigma of `mirror_field`'s displacement after each step, in widths: how stiff it is
DETAIL_SMOOTHING = 2 / 256  # `fine_mismatch`: the difference less itself smoothed this much (widths)
DETAIL_WINDOW = 6 / 256  # `fine_mismatch`: Gaussian window of its root mean square, in widths
MISMATCH_FLOOR = 0.01  # added to `fine_mismatch` before the difference from the estimate is divided by it
FIT_WINDOW = 20 / 256  # `healthy_estimate`: Gaussian window of each place's fit, in widths (wider than a lesion)
FIT_RIDGE = 0.003  # `healthy_estimate`: how firmly each place's weights are held to MIRROR_WEIGHT's split
MIRROR_WEIGHT = 0.5  # `healthy_estimate`'s weight held for the mirror image; the healthy heads share the rest
SHARE_FLOOR = 1e-3  # added to the sum of a place's and its mirror place's likelihood map in `side_share`
SHARE_POWER = 0.5  # of the side share in the asymmetry map
ATLAS_NEIGHBOURS = 5  # healthy training slices an `Atlas` compares each slice with
ATLAS_GRID = 32  # `box_features`: a head is compared on a grid this many samples a side
ATLAS_SIDE = 0.7  # weight of the atlas's side share against the prior's (geometric mean) in the asymmetry map
SCALP = 10 / 256  # the asymmetry map fades in over this far inside the head's edge (widths): scalp and skull, ~1 cm
SCORE_PERCENTILES = (99.9, 99)  # a slice's score: the first percentile of its map less the second
SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp")  # taken off file names for output names


# ---------------------------------------------------------------------------
# Likelihood of each code


def level_names(prior):
    """The levels `level_nll` scores, coarsest first."""
    return list(prior.names) if isinstance(prior, hierarchy.HierarchicalPrior) else ["bottom"]


def level_nll(prior, codes):
    """{level: per-code NLL in nats} of (B, h, w) codes: "bottom" (the codes, given the grid
    above for a hierarchical prior) and, for a hierarchical prior, each coarser level's
    ("top", "middle") given the one above, with its grid under "<level>_codes". A top
    level that knows slice positions scores each slice at its likeliest position. Also the
    prior's own `code_nll` of the codes (slice position unknown) under "code_nll", from the
    same pass."""
    if isinstance(prior, hierarchy.HierarchicalPrior):
        grids, nlls = prior.level_nll(codes)
        found = {name: nll.numpy() for name, nll in zip(prior.names, nlls)}
        found.update({f"{name}_codes": grid.numpy() for name, grid in zip(prior.names[:-1], grids)})
        found["code_nll"] = prior.spread_nll(nlls).numpy()
        if prior.position_bins:
            found[prior.names[0]] = likeliest_position_nll(prior, grids[0])
        return found
    nll = prior.code_nll(codes).numpy()
    return {"bottom": nll, "code_nll": nll}


def likeliest_position_nll(prior, top):
    """The top PixelCNN's per-code NLL of (B, h', w') top grids, each at the position bin
    under which its whole grid is likeliest: a slice of unknown level is scored as the
    level it looks most like, not as any level at all."""
    count, bins = int(tf.shape(top)[0]), prior.position_bins
    positions = tf.repeat(tf.range(1, bins + 1), count)[:, None, None]  # class 0 is "unknown"; one pass for all bins
    per_bin = prior.networks[0].code_nll((tf.tile(top, (bins, 1, 1)), positions)).numpy()
    per_bin = per_bin.reshape(bins, count, *per_bin.shape[1:]).swapaxes(0, 1)
    likeliest = per_bin.sum(axis=(2, 3)).argmin(axis=1)
    return per_bin[np.arange(count), likeliest]


def reference(prior, grids, quantile=QUANTILE, batch_size=32):
    """How healthy (N, h, w) code grids (the run's validation split) score under the prior:
    {level: {"mean", "spread": each grid position's NLL mean and standard deviation (plus
    SPREAD_FLOOR), "limit": the `quantile` of the z-scores (NLL - mean) / spread}}."""
    values = {}
    for start in range(0, len(grids), batch_size):
        found = level_nll(prior, tf.constant(grids[start: start + batch_size]))
        for level in level_names(prior):
            values.setdefault(level, []).append(found[level])
    found = {}
    for level, parts in values.items():
        nll = np.concatenate(parts)
        mean, spread = nll.mean(axis=0), nll.std(axis=0) + SPREAD_FLOOR
        found[level] = {"mean": mean, "spread": spread, "limit": float(np.quantile((nll - mean) / spread, quantile))}
    return found


def level_z(prior, codes, healthy):
    """`level_nll` of (B, h, w) codes with each level's NLL as z-scores against `healthy`
    (`reference`): how much less likely each code is than healthy codes at its place."""
    found = level_nll(prior, codes)
    for level, stats in healthy.items():
        found[level] = (found[level] - stats["mean"]) / stats["spread"]
    return found


# ---------------------------------------------------------------------------
# Healing


def mark(nll, limit):
    """The (B, h, w) bool mask of codes to redraw: those whose score (`level_z`) is above
    `limit`, and their neighbours."""
    return ndimage.binary_dilation(nll > limit, np.ones((1, 3, 3), bool))


class Healer:
    """Redraws the unlikely codes of (batch_size, height, width) code grids from a prior,
    given the likely ones, with exact cached samplers (one per level)."""

    def __init__(self, prior, batch_size, height, width):
        self.prior = prior
        self.hierarchical = isinstance(prior, hierarchy.HierarchicalPrior)
        self.sampler = hierarchy.sampler_for(prior, batch_size, height, width)

    def heal(self, codes, healthy, seed=0, z=None):
        """(healed codes, marked codes): the (B, h, w) codes with the codes `mark` picks by
        their z-score and their level's limit in `healthy` (`reference`) redrawn (and, for a
        hierarchical prior, level by level from the top: also every code of a block whose
        code in the level above was redrawn and came out different), and the bool mask of
        the codes that were allowed to change. `z`: the codes' `level_z`, if already known."""
        nll = level_z(self.prior, tf.constant(codes), healthy) if z is None else z
        if not self.hierarchical:
            marked = mark(nll["bottom"], healthy["bottom"]["limit"])
            return self.sampler.sample(1.0, seed, fixed=codes, keep=~marked).numpy(), marked
        condition = np.zeros((len(codes), 1, 1), np.int32) if self.prior.position_bins else None  # position unknown
        names, factors = self.prior.names, self.prior.factors
        before = healed = None
        for index, (name, sampler) in enumerate(zip(names, self.sampler.samplers)):
            grid = codes if name == "bottom" else nll[f"{name}_codes"]
            marked = mark(nll[name], healthy[name]["limit"])
            if index:
                ratio = factors[index - 1] // factors[index]
                marked |= self.prior.upsample(tf.constant(healed != before), *grid.shape[1:], ratio).numpy()
            before, healed = grid, sampler.sample(1.0, seed + hierarchy.seed_offset(index, len(names)),
                                                  condition=condition, fixed=grid, keep=~marked).numpy()
            condition = healed
        return healed, marked


def anomaly_maps(model, healer, images, healthy, draws=DRAWS, seed=0, kind=MAPS[0], mirror=False, atlas=None):
    """Anomaly maps of (B, H, W, 1) slices in [0, 1] (B * draws = the healer's batch),
    against healthy codes' `reference`: a dict of "maps" (B, H, W) of `kind` (one of MAPS),
    "healed" (B, H, W) slices, "scores" (B,), per-code "nll" (B, h, w) and the share of
    codes "marked" (B,). With `mirror` (for a prior that learnt mirrored slices too), the
    likelihood map is the mean of the slice's and its mirror image's. The asymmetry map
    (`asymmetry_map`) also compares each slice with the healthy heads of an `atlas`
    (`run_atlas`), if given."""
    batch = len(images)
    codes = model.encode(images + model.shift).numpy()
    z = level_z(healer.prior, tf.constant(codes), healthy)
    repeated = np.repeat(codes, draws, axis=0)
    healed_codes, marked = healer.heal(repeated, healthy, seed, {key: np.repeat(value, draws, axis=0)
                                                                 for key, value in z.items()})
    decoded = np.concatenate([model.decode_images(healed_codes[start: start + batch])[..., 0]  # a batch at a time
                              for start in range(0, len(healed_codes), batch)])
    healed = decoded.reshape(batch, draws, *decoded.shape[1:]).mean(axis=1)
    if kind == "healing":
        changed = (healed_codes != repeated).reshape(batch, draws, *codes.shape[1:]).any(axis=1)
        scale = model.downsampling
        region = np.repeat(np.repeat(changed, scale, axis=1), scale, axis=2)
        # A code's decoded pixels spill over its neighbours: widen the region by one code.
        region = ndimage.binary_dilation(region, np.ones((1, 2 * scale + 1, 2 * scale + 1), bool))
        maps = ndimage.gaussian_filter(np.abs(images[..., 0] - healed) * region, (0, SMOOTHING, SMOOTHING))
    else:
        maps, block = coarse_z_map(model, healer.prior, z, images.shape[1:3])
        if mirror:  # the mirror image's map, mirrored back: a second look at each place
            mirrored = level_z(healer.prior, model.encode(images[:, :, ::-1] + model.shift), healthy)
            maps = (maps + coarse_z_map(model, healer.prior, mirrored, images.shape[1:3])[0][:, :, ::-1]) / 2
        maps = ndimage.gaussian_filter(np.maximum(maps, 0), (0, block / 4, block / 4))
        if kind == "asymmetry":
            maps = asymmetry_map(images[..., 0], maps, atlas)
    maps *= head(images[..., 0], model.downsampling)
    return {"maps": maps.astype(np.float32), "healed": healed, "nll": z["code_nll"],
            "scores": slice_scores(maps),
            "marked": marked.reshape(batch, draws, *codes.shape[1:])[:, 0].mean(axis=(1, 2))}


def asymmetry_map(slices, likelihood, atlas=None):
    """The default map of (B, H, W) slices in [0, 1], given their likelihood maps: how far
    each slice departs from its `healthy_estimate` (from its bent mirror image and, with an
    `atlas`, the healthy heads most like it), smoothed, over the fine mismatch around it;
    times the square root of the side share (the likelihood map's and, with an atlas, the
    atlas deviation's: which side of an asymmetry is the lesion's), faded in over the scalp
    (`depth`)."""
    transforms, fields = mirrors(slices)
    share = side_share(likelihood, transforms, fields)
    candidates = mirror_images(slices, transforms, fields)[:, None]  # (B, 1, H, W): each slice's mirror image
    if atlas is not None:  # healthy heads like it; which side differs from them
        references = atlas.references_of(slices)
        deviation = atlas.deviation(slices, references)
        share = share ** (1 - ATLAS_SIDE) * side_share(deviation, transforms, fields) ** ATLAS_SIDE
        candidates = [np.concatenate([mirror, found]) for mirror, found in zip(candidates, references)]
    expected = np.stack(each(lambda pair: healthy_estimate(*pair, candidate_weights(len(pair[1]))),
                             list(zip(slices, candidates))))
    maps = smoothed_difference(slices, expected) / (fine_mismatch(slices - expected) + MISMATCH_FLOOR)
    return maps * share ** SHARE_POWER * depth(slices)


def slice_scores(maps):
    """(B,) scores of (B, H, W) maps: how far each map's brightest small region (its 99.9th
    percentile, SCORE_PERCENTILES) stands above the rest of its brightest percent (its 99th).
    A lesion lifts the first far more than the second; a slice whose two halves differ in many
    places lifts both."""
    top, rest = np.percentile(np.reshape(maps, (len(maps), -1)), SCORE_PERCENTILES, axis=1)
    return top - rest


def coarse_z_map(model, prior, z, size):
    """The coarsest level's z-scores of a `level_z` dict, each spread over the pixels its
    code stands for: a (B, H, W) map at the slices' `size`, and the side in pixels of a
    code's block."""
    hierarchical = isinstance(prior, hierarchy.HierarchicalPrior)
    level = level_names(prior)[0]
    scale = model.downsampling * (prior.factors[0] if hierarchical else 1)  # pixels per code along a side
    return hierarchy.HierarchicalPrior.upsample(z[level].astype(np.float32), *size, scale).numpy(), scale


def mirror_transform(image):
    """(angle in degrees, sideways shift in pixels, across rows) that turn and move the (H, W)
    slice's mirror image (`mirrored`) to lie on it as well as it can (`mirror_fits`). A head
    lying on its side (left and right running down the rows, as a 3D volume's slices may be
    stored) is mirrored top to bottom instead (the third value True; its angle and shift are
    those of the transposed slice) when that mirror image lies on the slice clearly better
    (SIDEWAYS). (0, 0, False) for a slice with no head."""
    if not (image[::4, ::4] > FOREGROUND).any():  # no head to align (a blank slice padding a batch): the plain mirror
        return 0.0, 0.0, False
    ((angle, shift), difference), ((sideways_angle, sideways_shift), sideways_difference) = mirror_fits(image)
    across_rows = sideways_difference < SIDEWAYS * difference
    if across_rows:
        angle, shift = sideways_angle, sideways_shift
    return float(angle), float(shift), bool(across_rows)


def mirror_fits(image):
    """The (H, W) slice's best left-to-right and best top-to-bottom mirror image (the
    transposed slice's left-to-right one): each ((angle, shift), the mean absolute
    difference from the slice inside the head), found by a search over angles and shifts on
    a 4x smaller slice, then a finer one around the best (0.5 degree, 1 pixel)."""

    def best(slice_, angles, shifts):
        inside = slice_ > FOREGROUND
        differences = {}
        for angle in angles:
            rotated = ndimage.rotate(slice_[:, ::-1], angle, reshape=False, order=1)
            for shift in shifts:
                differences[angle, shift] = np.abs(shift_columns(rotated, shift) - slice_)[inside].mean()
        found = min(differences, key=differences.get)
        return found, differences[found]

    def search(view):  # coarse on the 4x smaller view, then fine around the best
        small = view[::4, ::4]
        reach = max(1, small.shape[1] // 4)  # the head up to an eighth of the width off the centre
        (angle, shift), _ = best(small, np.arange(-12, 12.1, 1.5), range(-reach, reach + 1))
        return best(view, np.arange(angle - 1.5, angle + 1.6, 0.5), np.arange(4 * shift - 4, 4 * shift + 5))

    return search(image), search(image.T)


def shift_columns(image, shift):
    """The (H, W) image moved a whole number of columns to the right (left if `shift` < 0),
    zeros moved in: `ndimage.shift` by (0, shift) without its interpolation."""
    shift, moved = int(shift), np.zeros_like(image)
    if abs(shift) < image.shape[1]:
        if shift >= 0:
            moved[:, shift:] = image[:, : image.shape[1] - shift]
        else:
            moved[:, :shift] = image[:, -shift:]
    return moved


def mirror_field(image, transform):
    """(2, H, W) displacement, in pixels (rows, columns), that bends the (H, W) slice's
    rigidly aligned mirror image (`mirrored` by `transform`) onto it (`bend_field`): no two
    halves of a head are alike, and a turn and shift leave the ventricles', sulci's and the
    head edge's differences in place. Zero for a slice with no head."""
    image = np.asarray(image, np.float32)
    if not (image > FOREGROUND).any():
        return np.zeros((2,) + image.shape, np.float32)
    return bend_field(image, mirrored(image, transform))


def bend_field(fixed, moving, steps=BEND_STEPS):
    """(2, H, W) displacement, in pixels (rows, columns), that bends the (H, W) image
    `moving` onto `fixed` (`warp(moving, field)` lies on it). Thirion's demons, on both
    blurred and 2x smaller: each of `steps` steps moves every pixel along the bent
    image's gradient by their difference, then smooths the displacement (BEND_SMOOTHING of
    the width), so it stays too stiff to make a blob in even tissue vanish (one against a
    structure as bright on the other image may be partly filled by it)."""
    fixed, moving = np.asarray(fixed, np.float32), np.asarray(moving, np.float32)
    width = fixed.shape[1]
    blur = lambda x: ndimage.gaussian_filter(x, BEND_BLUR * width)[::2, ::2]  # noqa: E731
    small_fixed, small_moving = blur(fixed), blur(moving)
    small = np.zeros((2,) + small_fixed.shape, np.float32)
    for _ in range(steps):
        bent = warp(small_moving, small)
        difference = bent - small_fixed
        gradient = np.stack(np.gradient(bent))
        step = -difference * gradient / (np.sum(gradient ** 2, axis=0) + difference ** 2 + 1e-9)
        small = ndimage.gaussian_filter(small + np.clip(step, -1, 1), (0,) + (BEND_SMOOTHING * width / 2,) * 2)
    field = np.zeros((2,) + fixed.shape, np.float32)
    for axis in range(2):  # back to full size, in full-size pixels
        field[axis] = 2 * ndimage.zoom(small[axis], 2, order=1)[: fixed.shape[0], : fixed.shape[1]]
    return field


def warp(image, field):
    """The (H, W) image with each pixel taken from its place moved by the (2, H, W) `field`."""
    rows, columns = np.mgrid[: image.shape[0], : image.shape[1]].astype(np.float32)
    return ndimage.map_coordinates(image, [rows + field[0], columns + field[1]], order=1, mode="nearest")


def mirrored(image, transform, field=None):
    """The (H, W) image mirrored left to right (top to bottom if the `transform` is across
    rows), then turned and moved by `transform` (`mirror_transform` of the slice it belongs
    to) and bent by `field` (its `mirror_field`, if given): what lies at each place's mirror
    place."""
    angle, shift, across_rows = transform
    if across_rows:
        flipped = mirrored(image.T, (angle, shift, False)).T
    elif not angle and not shift:
        flipped = image[:, ::-1].copy()
    else:
        flipped = ndimage.shift(ndimage.rotate(image[:, ::-1], angle, reshape=False, order=1), (0, shift), order=1)
    return flipped if field is None else warp(flipped, field)


def aligned_mirror(image):
    """The (H, W) slice's mirror image, turned, moved (`mirror_transform`) and bent
    (`mirror_field`) to lie on it."""
    transform = mirror_transform(image)
    return mirrored(image, transform, mirror_field(image, transform))


def each(function, items):
    """[function(item) for item in items], in order, on a thread for each core this process
    may use: scipy's filters and interpolation let go of Python's lock, so slices are
    aligned side by side."""
    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(cores) as pool:
        return list(pool.map(function, items))


def mirrors(images):
    """Each (H, W) slice's `mirror_transform` and `mirror_field`: ([(angle, shift, across rows)], [field])."""
    def align(image):
        transform = mirror_transform(image)
        return transform, mirror_field(image, transform)

    found = each(align, images)
    return [transform for transform, _ in found], [field for _, field in found]


def mirror_images(images, transforms, fields=None):
    """(B, H, W) images (slices, or maps of them), each `mirrored` by its slice's
    `mirror_transform` and `mirror_field` (not bent where `fields` is None)."""
    fields = [None] * len(images) if fields is None else fields
    return np.stack([mirrored(image, transform, field) for image, transform, field in zip(images, transforms, fields)])


def asymmetry(images, transforms=None, fields=None):
    """(B, H, W) slices -> (B, H, W) |slice - its aligned mirror image|, both smoothed
    (sigma SYMMETRY_SMOOTHING of the width): where a slice is not left-right symmetric.
    `transforms`, `fields`: each slice's `mirror_transform` and `mirror_field`, if already
    known (both found if `transforms` is not given)."""
    images = np.asarray(images, np.float32)
    if transforms is None:
        transforms, fields = mirrors(images)
    return smoothed_difference(images, mirror_images(images, transforms, fields))


def smoothed_difference(images, others):
    """(B, H, W) |images - others|, both smoothed (sigma SYMMETRY_SMOOTHING of the width)."""
    sigma = SYMMETRY_SMOOTHING * images.shape[2]
    return np.abs(ndimage.gaussian_filter(images - others, (0, sigma, sigma)))


def detail_mismatch(images, transforms, fields=None):
    """(B, H, W) how much each slice's fine detail and its bent mirror image's still differ
    around each place: the root mean square, over a Gaussian window (DETAIL_WINDOW of the
    width), of their difference less itself smoothed (DETAIL_SMOOTHING). Where sulci and
    edges do not quite meet after the bend it is high, and an asymmetry there means less; a
    lesion's smooth blob adds little to it but its edge."""
    images = np.asarray(images, np.float32)
    return fine_mismatch(images - mirror_images(images, transforms, fields))


def fine_mismatch(difference):
    """`detail_mismatch` of a (B, H, W) `difference`: a slice less its mirror image, or less
    its `healthy_estimate` (the asymmetry map)."""
    width = difference.shape[2]
    detail = difference - ndimage.gaussian_filter(difference, (0, DETAIL_SMOOTHING * width, DETAIL_SMOOTHING * width))
    return np.sqrt(ndimage.gaussian_filter(detail ** 2, (0, DETAIL_WINDOW * width, DETAIL_WINDOW * width)))


def healthy_estimate(image, candidates, weights, window=FIT_WINDOW, ridge=FIT_RIDGE):
    """The (H, W) slice as each place's own mix of (K, H, W) healthy `candidates` bent onto it
    (its mirror image, healthy heads): at every place, the weights of the candidates and the
    offset that fit the slice best over a Gaussian window wider than a lesion (`window` of
    the width; least squares, the weights held towards `weights` by `ridge`), applied there.
    Where the slice is brighter, darker or of other contrast than a candidate, or one
    candidate fits better than another, the fit follows; a lesion fills too little of the
    window to be fitted, so what the estimate shows there is the healthy tissue around it.
    The weights change slowly, so they are fitted on 2x2 block means and spread back."""
    image, candidates = np.asarray(image, np.float32), np.asarray(candidates, np.float32)
    count = len(candidates)
    sigma = window * image.shape[1] / 2
    local = lambda x: ndimage.gaussian_filter(halved(x), sigma)  # noqa: E731
    means = np.stack([local(candidate) for candidate in candidates], axis=-1)  # (H/2, W/2, K)
    covariance = np.empty(means.shape + (count,), np.float32)
    for i in range(count):
        for j in range(i, count):
            covariance[..., i, j] = covariance[..., j, i] = (local(candidates[i] * candidates[j])
                                                             - means[..., i] * means[..., j])
    mean = local(image)
    with_image = np.stack([local(candidate * image) for candidate in candidates], axis=-1) - means * mean[..., None]
    held = np.asarray(weights, np.float32)
    fitted = np.linalg.solve(covariance + ridge * np.eye(count, dtype=np.float32),
                             (with_image + ridge * held)[..., None])[..., 0]
    offset = mean - (fitted * means).sum(axis=-1)
    spread = lambda x: doubled(x, image.shape)  # noqa: E731
    return sum(spread(fitted[..., i]) * candidates[i] for i in range(count)) + spread(offset)


def halved(image):
    """The (H, W) image's 2x2 block means, (ceil(H / 2), ceil(W / 2)) (an odd last row or
    column repeated)."""
    rows, columns = image.shape
    padded = np.pad(image, ((0, rows % 2), (0, columns % 2)), mode="edge")
    return padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).mean(axis=(1, 3))


def doubled(image, shape):
    """A `halved` image spread back to `shape`, each block's value at its centre and linear
    between."""
    zoomed = ndimage.zoom(image, 2, order=1, grid_mode=True, mode="nearest")
    return zoomed[: shape[0], : shape[1]]


def candidate_weights(count):
    """The weights `healthy_estimate` holds `count` candidates to: MIRROR_WEIGHT for the first
    (the mirror image), the rest shared evenly by the others (healthy heads)."""
    if count == 1:
        return np.ones(1, np.float32)
    return np.array([MIRROR_WEIGHT] + [(1 - MIRROR_WEIGHT) / (count - 1)] * (count - 1), np.float32)


def side_share(maps, transforms, fields=None):
    """(B, H, W) likelihood maps -> each place's share of its value and its mirror place's
    (`mirrored` by each slice's `mirror_transform` and `mirror_field`): above a half on the
    side of an asymmetry that the prior finds less likely, the lesion's rather than its
    mirror place's."""
    return maps / (maps + mirror_images(maps, transforms, fields) + SHARE_FLOOR)


def head(images, margin):
    """(B, H, W) bool: each slice's head (pixels above FOREGROUND, holes filled), widened by
    `margin` pixels so that a lesion at its edge keeps its whole map."""
    inside = np.stack([ndimage.binary_fill_holes(image > FOREGROUND) for image in images])
    return ndimage.binary_dilation(inside, np.ones((1, 2 * margin + 1, 2 * margin + 1), bool))


def depth(images, scalp=SCALP):
    """(B, H, W) in [0, 1]: how deep each place of each slice lies inside its head (`head`),
    rising from 0 at the edge to 1 at `scalp` widths in. The scalp and skull are where a
    head is least symmetric (ears, jaw, the outline) and brain lesions are not."""
    inside = head(images, 0)
    return np.stack([np.minimum(ndimage.distance_transform_edt(mask) / (scalp * mask.shape[1]), 1)
                     for mask in inside]).astype(np.float32)


# ---------------------------------------------------------------------------
# Healthy heads of other people


def head_box(image):
    """(top, bottom, left, right) pixel bounds of the (H, W) slice's head: its largest
    part above FOREGROUND (opened, so that background noise does not widen it); the whole
    slice for a slice with no head."""
    inside = ndimage.binary_opening(image > FOREGROUND, iterations=2)
    parts, count = ndimage.label(inside)
    if not count:
        return np.array([0, image.shape[0] - 1, 0, image.shape[1] - 1], np.float32)
    rows, columns = np.nonzero(parts == 1 + np.argmax(ndimage.sum(inside, parts, range(1, count + 1))))
    return np.array([rows.min(), rows.max(), columns.min(), columns.max()], np.float32)


def box_features(image, box, size=ATLAS_GRID):
    """The (H, W) slice's head `box`, blurred and sampled on a `size` x `size` grid, flat:
    what two heads of different size and place are compared by."""
    top, bottom, left, right = box
    rows, columns = np.meshgrid(np.linspace(top, bottom, size), np.linspace(left, right, size), indexing="ij")
    blurred = ndimage.gaussian_filter(image, image.shape[1] / (4 * size))
    return ndimage.map_coordinates(blurred, [rows, columns], order=1).ravel().astype(np.float32)


def fit_to_box(image, box, target_box, shape):
    """The (H, W) slice stretched and moved so that its head `box` lies on `target_box`, in
    a `shape` frame."""
    top, bottom, left, right = target_box
    row_scale = (box[1] - box[0]) / max(bottom - top, 1)
    column_scale = (box[3] - box[2]) / max(right - left, 1)
    rows, columns = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    return ndimage.map_coordinates(image, [box[0] + (rows - top) * row_scale, box[2] + (columns - left) * column_scale],
                                   order=1, cval=0.0)


class Atlas:
    """Healthy slices of other people: a run's training code grids, `decode`d by its VQ-VAE
    ((N, h, w) grids -> (N, H, W, 1) slices), and their mirror images; those whose heads look
    most like a slice's (`box_features`), stretched onto its head (`fit_to_box`) and bent
    onto it (`bend_field`). Where a slice differs from the healthy heads most like it, and
    more than at its mirror place, it is more likely the lesion's side of an asymmetry."""

    def __init__(self, decode, grids, boxes, features):
        self.decode, self.grids, self.boxes, self.features = decode, grids, boxes, features

    @classmethod
    def from_grids(cls, decode, grids, batch_size=32):
        """Decode (N, h, w) healthy code grids once for their head boxes and features (each
        grid twice: as it is and mirrored)."""
        boxes, features = [], []
        for start in range(0, len(grids), batch_size):
            for image in decode(grids[start: start + batch_size])[..., 0]:
                for view in (image, image[:, ::-1]):
                    boxes.append(head_box(view))
                    features.append(box_features(view, boxes[-1]))
        return cls(decode, grids, np.stack(boxes), np.stack(features))

    def references(self, image, count=ATLAS_NEIGHBOURS):
        """(count, H, W): the `count` healthy slices whose heads look most like the (H, W)
        slice's, stretched and bent onto it. Empty for a slice with no head."""
        return self.references_of(np.asarray(image, np.float32)[None], count)[0]

    def references_of(self, images, count=ATLAS_NEIGHBOURS, batch_size=32):
        """`references` of each of (B, H, W) slices: a list of (count, H, W) arrays. The
        references of all the slices are decoded together and bent onto them side by side."""
        boxes = [head_box(image) if (image > FOREGROUND).any() else None for image in images]
        nearest = [np.zeros(0, int) if box is None else
                   np.argsort(((self.features - box_features(image, box)) ** 2).sum(axis=1))[:count]
                   for image, box in zip(images, boxes)]
        wanted = np.unique(np.concatenate(nearest) // 2)  # each training grid decoded once
        decoded = {}
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start: start + batch_size]
            decoded.update(zip(chunk, self.decode(self.grids[chunk])[..., 0]))

        def fit(job):
            image, box, index = job
            reference = decoded[index // 2][:, ::-1] if index % 2 else decoded[index // 2]
            fitted = fit_to_box(reference, self.boxes[index], box, image.shape)
            return warp(fitted, bend_field(image, fitted, ATLAS_BEND_STEPS))

        found = iter(each(fit, [(image, box, index) for image, box, indices in zip(images, boxes, nearest)
                                for index in indices]))
        return [np.stack([next(found) for _ in indices]) if len(indices) else np.zeros((0,) + image.shape, np.float32)
                for image, indices in zip(images, nearest)]

    def deviation(self, images, references=None):
        """(B, H, W) |slice - the mean of its `references`|, both smoothed like the
        asymmetry (`smoothed_difference`); zero for a slice with no head. `references`: the
        slices' `references_of`, if already found."""
        images = np.asarray(images, np.float32)
        references = self.references_of(images) if references is None else references
        means = [found.mean(axis=0) if len(found) else image  # no head: no deviation
                 for image, found in zip(images, references)]
        return smoothed_difference(images, np.stack(means))


def run_atlas(run_dir, model):
    """The `Atlas` of a run's training code grids (RUN/codes.npz), with their head boxes and
    features kept in RUN/anomaly_atlas.npz (made again when the grids change)."""
    import hashlib

    import files
    from data import DataError

    codes_path = os.path.join(run_dir, "codes.npz")
    if not os.path.exists(codes_path):
        raise DataError(f"--run {run_dir}: no codes.npz, whose training code grids are the healthy heads compared with")
    with np.load(codes_path) as codes:
        if "train" not in codes.files:
            raise DataError(f"--run {run_dir}: codes.npz holds no training code grids (\"train\"), the healthy heads "
                            f"compared with")
        grids = codes["train"]
    fingerprint = hashlib.sha1(np.ascontiguousarray(grids).tobytes()).hexdigest()
    path = os.path.join(run_dir, "anomaly_atlas.npz")
    if os.path.exists(path):
        with np.load(path) as saved:
            if str(saved.get("fingerprint", "")) == fingerprint and int(saved["grid"]) == ATLAS_GRID:
                return Atlas(model.decode_images, grids, saved["boxes"], saved["features"])
    print(f"healthy atlas: the head box and features of each of the {len(grids)} training slices", flush=True)
    atlas = Atlas.from_grids(model.decode_images, grids)
    files.atomic_write(path, lambda temporary: np.savez(temporary, boxes=atlas.boxes, features=atlas.features,
                                                       grid=ATLAS_GRID, fingerprint=fingerprint))
    return atlas


# ---------------------------------------------------------------------------
# Files in, maps out


def to_input_size(image, shape, size):
    """Undo `data.fit_to_size`: crop the padding tf.image.resize_with_pad added around an
    (H', W') slice of `size` when it resized one of `shape`, and resize back to `shape`."""
    height, width = shape
    ratio = max(height / size[0], width / size[1])
    inner = (int(np.floor(height / ratio)), int(np.floor(width / ratio)))
    top, left = (max(0, int(np.floor((size[i] - (height, width)[i] / ratio) / 2))) for i in range(2))
    crop = image[top: top + inner[0], left: left + inner[1]]
    return tf.image.resize(crop[..., None], shape, method="bilinear").numpy()[..., 0]


def file_slices(path, slice_axis=-1, volume_index=0):
    """The [0, 1] 2D slices of an image file as the run reads them (a PNG gives one, a
    NIfTI file one per slice), and how to write a map of the file: (nibabel affine or
    None, slice axis or None for a 2D file). A NIfTI slice stored as (H, W, 1) is a volume
    of one slice along its third axis, so that its map has the file's shape."""
    import data

    if data.is_png(path):
        return [data.decode_png(path).numpy()[..., 0]], (None, None)
    import nibabel

    slices = data.nifti_slices(path, slice_axis, volume_index)
    image = nibabel.load(path)
    if len(slices) > 1:
        axis = slice_axis
    else:  # (H, W, 1), or a series of such volumes: the map keeps the singleton axis
        axis = 2 if len(image.shape) >= 3 and image.shape[2] == 1 else None
    return slices, (image.affine, axis)


def stem(path):
    """A file's name without `.png`, `.nii` or `.nii.gz` (`case_1_slice_0.nii.png` -> `case_1_slice_0`)."""
    name = os.path.basename(path)
    while True:
        suffix = next((s for s in SUFFIXES if name.lower().endswith(s)), None)
        if suffix is None or len(name) == len(suffix):
            return name
        name = name[: -len(suffix)]


def readable_files(paths, run_config):
    """(path, its [0, 1] slices, (affine, slice axis)) for each file of `paths` that can be
    read (`file_slices`); a file that cannot is named with its reason and skipped."""
    import data

    for path in paths:
        try:
            slices, layout = file_slices(path, run_config.get("slice_axis", -1), run_config.get("volume_index", 0))
        except (data.DataError, tf.errors.OpError) as error:
            reason = data.error_reason(error) if isinstance(error, tf.errors.OpError) else str(error)
            print(f"\nskipped {path}: {reason}", flush=True)
            continue
        yield path, slices, layout


def write_maps(model, prior, paths, run_config, out, healthy, draws=DRAWS, batch_size=BATCH, seed=0, kind=MAPS[0],
               atlas=None):
    """Anomaly maps (`kind`, against healthy codes' `reference` and the healthy heads of
    `atlas`, if given) of every slice of the files at `paths`, written to OUT per file:
    `<stem>_anomaly.nii.gz` (float32, at the file's own height and width, in its own space
    for NIfTI; a volume gives a volume), `<stem>_anomaly.png` (slice, healed slice and map;
    a volume's highest-scoring slice), `<stem>_code_nll.npy` (per-code NLL in nats), and
    `OUT/scores.csv` (file, score: a volume's highest slice score). Returns the rows.

    Slices are healed `batch_size` at a time whichever files they come from (a folder of
    PNGs is one slice a file; fewer slices in all, all at once), and each file is written as
    soon as its last slice is done."""
    import data
    import files

    size, mirror = run_config["image_size"], run_config.get("pcnn_mirror", False)
    height, width = size[0] // model.downsampling, size[1] // model.downsampling
    healer = None  # made for the first batch: `batch_size` slices, or all of them if there are fewer
    os.makedirs(out, exist_ok=True)
    files.remove_stale_temporaries(out)
    progress, rows, waiting, queue = data.progress_bar(len(paths), "file"), [], [], []
    number = {path: count for count, path in enumerate(paths, 1)}  # for the progress bar

    def heal_batch(count):
        """Maps of the first `count` queued slices (the batch filled up with blank slices)."""
        nonlocal healer
        healer = healer or Healer(prior, count * draws, height, width)
        batch, queue[:] = queue[:count], queue[count:]
        chunk = [data.fit_to_size(image[..., None], size).numpy() for _, image in batch]
        images = np.stack(chunk + [np.zeros_like(chunk[0])] * (healer.sampler.batch_size // draws - len(chunk)))
        found = anomaly_maps(model, healer, images, healthy, draws, seed, kind, mirror, atlas)
        for i, (entry, _) in enumerate(batch):
            entry["results"].append({key: value[i] for key, value in found.items()})
        while waiting and len(waiting[0]["results"]) == len(waiting[0]["slices"]):
            entry = waiting.pop(0)
            rows.append(write_file(entry, size, out, run_config.get("cmap", "gray")))
            progress.update(number[entry["path"]])

    for path, slices, (affine, axis) in readable_files(paths, run_config):
        entry = {"path": path, "slices": slices, "affine": affine, "axis": axis, "results": []}
        waiting.append(entry)
        queue += [(entry, image) for image in slices]
        while len(queue) >= batch_size:
            heal_batch(batch_size)
    if queue:
        heal_batch(len(queue))
    if not rows:
        raise data.DataError(f"none of the {len(paths)} files could be read (each is named above with its reason)")
    files.write_csv(os.path.join(out, "scores.csv"), ["file", "score"], [(n, f"{s:.6f}") for n, s in rows])
    return rows


def write_file(entry, size, out, cmap):
    """Write one file's map, code NLL and figure (`write_maps`); its (file name, score) row."""
    import nibabel

    import files
    import plots

    originals, results, affine, axis = entry["slices"], entry["results"], entry["affine"], entry["axis"]
    maps = np.stack([to_input_size(result["maps"], image.shape, size) for result, image in zip(results, originals)])
    name = os.path.join(out, stem(entry["path"]))
    volume = maps[0] if axis is None else np.moveaxis(maps, 0, axis)
    files.atomic_write(name + "_anomaly.nii.gz", lambda temporary: nibabel.save(
        nibabel.Nifti1Image(volume.astype(np.float32), np.eye(4) if affine is None else affine), temporary))
    nll = np.stack([result["nll"] for result in results])
    files.atomic_write(name + "_code_nll.npy", lambda temporary: np.save(temporary, nll[0] if axis is None else nll))
    scores = [float(result["scores"]) for result in results]
    best = int(np.argmax(scores))
    healed = to_input_size(results[best]["healed"], originals[best].shape, size)
    plots.anomaly_figure([[originals[best], healed, maps[best]]], name + "_anomaly.png",
                         titles=("slice" + (f" {best}" if axis is not None else ""), "healed",
                                 f"anomaly map (score {scores[best]:.3f})"), cmap=cmap)
    return os.path.basename(entry["path"]), max(scores)


def run_reference(run_dir, prior, quantile=QUANTILE):
    """`reference` of a run's prior from the validation split's code grids in RUN/codes.npz,
    kept in RUN/anomaly_reference.npz (made again for another quantile, SPREAD_FLOOR or
    REFERENCE_VERSION)."""
    import files
    from data import DataError

    path = os.path.join(run_dir, "anomaly_reference.npz")
    if os.path.exists(path):
        with np.load(path) as saved:
            same = [float(saved.get(key, -1)) for key in ("quantile", "spread_floor", "version")]
            if same == [quantile, SPREAD_FLOOR, REFERENCE_VERSION]:
                levels = [key[: -len("_limit")] for key in saved.files if key.endswith("_limit")]
                return {level: {"mean": saved[f"{level}_mean"], "spread": saved[f"{level}_spread"],
                                "limit": float(saved[f"{level}_limit"])} for level in levels}
    codes_path = os.path.join(run_dir, "codes.npz")
    if not os.path.exists(codes_path):
        raise DataError(f"--run {run_dir}: no codes.npz, whose validation code grids say how healthy codes score")
    print(f"healthy reference: each code position's NLL over the validation split, and the {quantile:g} quantile "
          f"of the z-scores", flush=True)
    with np.load(codes_path) as codes:
        healthy = reference(prior, codes["validate"], quantile)
    arrays = {f"{level}_{key}": value for level, stats in healthy.items() for key, value in stats.items()}
    files.atomic_write(path, lambda temporary: np.savez(temporary, quantile=quantile, spread_floor=SPREAD_FLOOR,
                                                                   version=REFERENCE_VERSION, **arrays))
    return healthy


def map_folder(run_dir, folder, split="test", out=None, draws=DRAWS, quantile=QUANTILE, batch_size=BATCH, seed=0,
               kind=MAPS[0]):
    """`driver.py anomaly`: the `kind` maps of every file in `folder` (its `split` folder, if
    it has split folders) from a run's models, in `out` (default RUN/anomaly-<folder name>)."""
    import runs

    config = runs.load_config(run_dir)
    model, prior = (runs.load_model(run_dir, name) for name in ("vqvae.keras", "pixelcnn.keras"))
    folder, paths = runs.input_files(folder, split)
    out = out or os.path.join(run_dir, f"anomaly-{os.path.basename(os.path.normpath(folder))}")
    healthy = run_reference(run_dir, prior, quantile)
    atlas = run_atlas(run_dir, model) if kind == "asymmetry" else None
    print(f"{kind} anomaly maps of {len(paths)} files from {folder}: {draws} healed versions each", flush=True)
    rows = write_maps(model, prior, paths, config, out, healthy, draws, batch_size, seed, kind, atlas)
    print(f"wrote the maps of {len(rows)} files and scores.csv to {out}", flush=True)
    return rows
