"""Data: folders of 2D MRI slices in, `tf.data.Dataset`s of float32 (H, W, 1) slices out.

Three layouts are understood:

* OASIS course layout: a root holding `keras_png_slices_{train,validate,test}` of PNG
  slices, read with `keras.utils.image_dataset_from_directory`. The `keras_png_slices_seg_*`
  folders hold segmentation masks, not images, and are ignored.
* HipMRI course layout: a root holding `keras_slices_{train,validate,test}` of NIfTI files
  (`.nii` / `.nii.gz`), read by a nibabel generator through `tf.data`.
* A flat folder of PNG or NIfTI files with no split folders. It is split into train,
  validate and test by case (`case_NNN` in the file name, or the subject stem of a volume)
  with a fixed seed, so one case never lands in two splits.

NIfTI files may hold 2D slices, 2D slices with a stray singleton axis (H, W, 1), whole 3D
volumes (cut into slices along `slice_axis`) or 4D series (volume `volume_index` is used).

Intensities: PNG slices are already 8-bit display images and are scaled by 1/255. NIfTI
files hold raw scanner values, so each file is normalised robustly to [0, 1] by clipping
to its 0.5th and 99.5th percentiles. NaN and Inf become 0 and a constant slice becomes all
zeros. `shift` is then added, so [0, 1] becomes [shift, 1 + shift].

Every slice is resized to fit `image_size` with its aspect ratio kept and zero padding
(`tf.image.resize_with_pad`), so files of different shapes batch together.
"""

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf

SPLITS = ("train", "validate", "test")
OASIS_DIRS = {split: f"keras_png_slices_{split}" for split in SPLITS}
HIPMRI_DIRS = {split: f"keras_slices_{split}" for split in SPLITS}
PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
PERCENTILES = (0.5, 99.5)


class DataError(ValueError):
    """A data folder or file that cannot be used, with a message naming it."""


@dataclasses.dataclass
class SliceSource:
    """Where a dataset's slices come from: its layout and the files of each split."""

    root: str
    layout: str  # "oasis", "hipmri", "flat-png" or "flat-nifti"
    files: dict  # split name -> sorted list of file paths

    @property
    def is_png(self):
        return self.layout in ("oasis", "flat-png")


# ---------------------------------------------------------------------------
# Finding files


def is_png(path):
    return path.lower().endswith(PNG_SUFFIXES)


def is_nifti(path):
    return path.lower().endswith(NIFTI_SUFFIXES)


def list_images(folder):
    """Sorted PNG and NIfTI files directly inside `folder`."""
    names = sorted(os.listdir(folder))
    return [
        os.path.join(folder, name)
        for name in names
        if (is_png(name) or is_nifti(name)) and os.path.isfile(os.path.join(folder, name))
    ]


def case_id(path):
    """The case or subject a file belongs to: `case_NNN` if the name has one, else its stem
    without the extension and any `_slice_K` suffix (`Subj3_T1.nii.gz` -> `Subj3_T1`)."""
    name = os.path.basename(path)
    match = re.search(r"case_\d+", name)
    if match:
        return match.group(0)
    for suffix in NIFTI_SUFFIXES + PNG_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"_slice_\d+$", "", name)


def split_by_case(files, seed, fractions=SPLIT_FRACTIONS):
    """Split files into train/validate/test so that no case is in two splits.

    Cases are shuffled with `seed`; validate and test each get at least one case."""
    cases = sorted({case_id(f) for f in files})
    if len(cases) < 3:
        raise DataError(
            f"a flat folder needs files from at least 3 cases to split into "
            f"train/validate/test, found {len(cases)} ({', '.join(cases)})"
        )
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = max(1, round(fractions[1] * len(cases)))
    n_test = max(1, round(fractions[2] * len(cases)))
    n_train = len(cases) - n_val - n_test
    chosen = {
        "train": {cases[i] for i in order[:n_train]},
        "validate": {cases[i] for i in order[n_train : n_train + n_val]},
        "test": {cases[i] for i in order[n_train + n_val :]},
    }
    return {split: [f for f in files if case_id(f) in chosen[split]] for split in SPLITS}


def find_source(root, seed=0):
    """Work out the layout of a data folder and list the files of each split."""
    if not os.path.isdir(root):
        raise DataError(f"--data {root}: no such folder")
    for layout, dirs in (("oasis", OASIS_DIRS), ("hipmri", HIPMRI_DIRS)):
        present = [d for d in dirs.values() if os.path.isdir(os.path.join(root, d))]
        if not present:
            continue
        missing = sorted(set(dirs.values()) - set(present))
        if missing:
            raise DataError(f"--data {root}: {layout} layout but missing {', '.join(missing)}")
        wanted = is_png if layout == "oasis" else is_nifti
        files = {}
        for split, d in dirs.items():
            files[split] = [f for f in list_images(os.path.join(root, d)) if wanted(f)]
            if not files[split]:
                kind = "PNG" if layout == "oasis" else ".nii/.nii.gz"
                raise DataError(f"--data {os.path.join(root, d)}: no {kind} files")
        return SliceSource(root, layout, files)

    files = list_images(root)
    if not files:
        raise DataError(
            f"--data {root}: no images found: expected keras_png_slices_* or keras_slices_* "
            f"split folders, or PNG/NIfTI files"
        )
    pngs = [f for f in files if is_png(f)]
    layout, files = ("flat-png", pngs) if len(pngs) >= len(files) / 2 else (
        "flat-nifti", [f for f in files if is_nifti(f)])
    return SliceSource(root, layout, split_by_case(files, seed))


# ---------------------------------------------------------------------------
# Reading and normalising


def normalize_intensity(array):
    """Robustly map raw intensities to [0, 1]: clip to the 0.5th-99.5th percentile range.

    NaN and Inf become 0; an array with no range (constant, or all NaN) becomes zeros."""
    array = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = np.percentile(array, PERCENTILES)
    if not high > low:
        return np.zeros_like(array)
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def nifti_slices(path, slice_axis=-1, volume_index=0):
    """The 2D slices of one NIfTI file as float32 arrays in [0, 1].

    2D files give one slice; (H, W, 1) arrays lose their singleton axis; 3D volumes are
    normalised as a whole and cut along `slice_axis`; 4D series use volume `volume_index`."""
    import nibabel

    try:
        array = np.asanyarray(nibabel.load(path).dataobj)
    except Exception as error:  # nibabel raises many types for broken files
        raise DataError(f"{path}: cannot read NIfTI ({error})") from error
    if array.ndim == 4:
        if not 0 <= volume_index < array.shape[3]:
            raise DataError(f"{path}: 4D with {array.shape[3]} volumes, no volume {volume_index}")
        array = array[..., volume_index]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or min(array.shape) == 0:
        raise DataError(f"{path}: expected a 2D slice or 3D volume, got shape {array.shape}")
    array = normalize_intensity(array)
    if array.ndim == 2:
        return [array]
    return list(np.moveaxis(array, slice_axis, 0))


def nifti_shape(path, slice_axis=-1):
    """The 2D shape of the slices in a NIfTI file, read from its header alone."""
    import nibabel

    shape = list(nibabel.load(path).shape)
    if len(shape) == 4:
        shape = shape[:3]
    if len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    if len(shape) == 3:
        del shape[slice_axis]
    return tuple(shape)


def decode_png(path):
    """One image file (PNG, JPEG or BMP) as an (H, W, 1) float32 tensor in [0, 1]."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=1, expand_animations=False)
    return tf.cast(image, tf.float32) / 255.0


def default_image_size(source, multiple, slice_axis=-1):
    """A target size taken from the data: the largest height and width of the training
    slices, rounded up to a multiple of the model's downsampling factor."""
    files = source.files["train"]
    if source.is_png:
        shapes = [tuple(decode_png(files[0]).shape[:2])]  # the PNG layouts hold slices of one size
    else:
        shapes = [nifti_shape(f, slice_axis) for f in files]
    height = max(s[0] for s in shapes)
    width = max(s[1] for s in shapes)
    return (-(-height // multiple) * multiple, -(-width // multiple) * multiple)


# ---------------------------------------------------------------------------
# tf.data pipelines


def fit_to_size(image, image_size):
    """Resize an (H, W, 1) slice to `image_size`, keeping aspect ratio and zero padding."""
    return tf.image.resize_with_pad(image, image_size[0], image_size[1], antialias=True)


def png_dataset(folder, image_size, shuffle, seed):
    """Unbatched (H, W, 1) float32 slices in [0, 1] from a folder of PNG files."""
    import keras

    dataset = keras.utils.image_dataset_from_directory(
        folder,
        labels=None,
        color_mode="grayscale",
        image_size=tuple(image_size),
        pad_to_aspect_ratio=True,
        batch_size=None,
        shuffle=shuffle,
        seed=seed,
        verbose=False,
    )
    return dataset.map(lambda image: image / 255.0, num_parallel_calls=tf.data.AUTOTUNE)


def nifti_dataset(files, image_size, shuffle, seed, slice_axis=-1, volume_index=0):
    """Unbatched (H, W, 1) float32 slices in [0, 1] from NIfTI files.

    Files are read by a nibabel generator, several in parallel through `interleave`, so the
    whole dataset is never in memory."""

    def generate(path):
        for image in nifti_slices(path.decode(), slice_axis, volume_index):
            yield image[..., None]

    def read_file(path):
        return tf.data.Dataset.from_generator(
            generate,
            args=(path,),
            output_signature=tf.TensorSpec(shape=(None, None, 1), dtype=tf.float32),
        )

    paths = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle:
        paths = paths.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = paths.interleave(
        read_file,
        cycle_length=4,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle,
    )
    return dataset.map(lambda image: fit_to_size(image, image_size), num_parallel_calls=tf.data.AUTOTUNE)


def split_dataset(source, split, image_size, batch_size, shift=0.0, shuffle=False, seed=0,
                  slice_axis=-1, volume_index=0):
    """Batched, prefetched float32 (B, H, W, 1) slices of one split, in [shift, 1 + shift]."""
    files = source.files[split]
    if source.layout == "oasis":
        dataset = png_dataset(os.path.join(source.root, OASIS_DIRS[split]), image_size, shuffle, seed)
    elif source.layout == "flat-png":
        dataset = tf.data.Dataset.from_tensor_slices(files)
        if shuffle:
            dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.map(lambda path: fit_to_size(decode_png(path), image_size),
                              num_parallel_calls=tf.data.AUTOTUNE)
    else:
        dataset = nifti_dataset(files, image_size, shuffle, seed, slice_axis, volume_index)
    if shuffle:
        dataset = dataset.shuffle(512, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda image: image + shift, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# The built-in demo dataset


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
