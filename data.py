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

`decoded_slices` gives every slice of a split once; `cache.py` stores them as TFRecord
shards and every epoch reads those back, so files are decoded only once.

Slice position: each slice also carries its relative level in its volume, in [0, 1]
(`slice_positions`): the slice number in names such as `case_001_slice_12.nii.png` over
the range of its case's slice numbers, or the slice index of a 3D volume; `UNKNOWN_POSITION`
(-1) where there is none. The hierarchical prior can be conditioned on it.

Bad input: a file that cannot be used (truncated or corrupt, not an image, unreadable, all
NaN, a zero-size axis) is skipped, and named with its reason in the log and the cache's
manifest; one bad file among thousands should not end a run. A data folder that cannot be
used (missing, empty, a missing split folder, a split with no usable file) stops the run
with a `DataError` before training starts.
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
UNKNOWN_POSITION = -1.0
SLICE_NUMBER = re.compile(r"_slice_(\d+)")


class DataError(ValueError):
    """A data folder or file that cannot be used, with a message naming it."""


@dataclasses.dataclass
class SliceSource:
    """Where a dataset's slices come from: its layout and the files of each split."""

    root: str
    layout: str  # "oasis", "hipmri", "flat-png" or "flat-nifti"
    files: dict  # split name -> sorted list of file paths
    slices: dict = None  # split name -> number of usable slices, once the splits are cached
    ignored: list = dataclasses.field(default_factory=list)  # files of other kinds, not read

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
    """Sorted PNG and NIfTI file names directly inside `folder` (anything with an image
    suffix that is not a folder, so unreadable files and dangling links are reported later
    instead of silently ignored)."""
    names = sorted(os.listdir(folder))
    return [
        os.path.join(folder, name)
        for name in names
        if (is_png(name) or is_nifti(name)) and not os.path.isdir(os.path.join(folder, name))
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
    return re.sub(r"_slice_\d+(\.nii)?$", "", name)  # `x_slice_3.nii.png`, as OASIS names them


def slice_positions(files):
    """{path: relative position in [0, 1]} of files named `..._slice_K...`: K over the range
    of slice numbers among the files of the same case (the lowest 0, the highest 1). Files
    with no slice number, and cases with a single numbered slice, are left out (unknown)."""
    numbers = {}
    for path in files:
        match = SLICE_NUMBER.search(os.path.basename(path))
        if match:
            numbers[path] = int(match.group(1))
    ranges = {}
    for path, number in numbers.items():
        low, high = ranges.get(case_id(path), (number, number))
        ranges[case_id(path)] = (min(low, number), max(high, number))
    positions = {}
    for path, number in numbers.items():
        low, high = ranges[case_id(path)]
        if high > low:
            positions[path] = (number - low) / (high - low)
    return positions


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
        files, ignored = {}, []
        for split, d in dirs.items():
            files[split] = [f for f in list_images(os.path.join(root, d)) if wanted(f)]
            ignored += other_files(os.path.join(root, d), files[split])
            if not files[split]:
                kind = "PNG" if layout == "oasis" else ".nii/.nii.gz"
                raise DataError(f"--data {os.path.join(root, d)}: no {kind} files")
        return SliceSource(root, layout, files, ignored=ignored)

    files = list_images(root)
    if not files:
        raise DataError(
            f"--data {root}: no images found: expected keras_png_slices_* or keras_slices_* "
            f"split folders, or PNG/NIfTI files"
        )
    pngs = [f for f in files if is_png(f)]
    layout, files = ("flat-png", pngs) if len(pngs) >= len(files) / 2 else (
        "flat-nifti", [f for f in files if is_nifti(f)])
    return SliceSource(root, layout, split_by_case(files, seed), ignored=other_files(root, files))


def split_folder(root, split):
    """The folder holding a split's files: its split folder in the OASIS or HipMRI layout,
    or `root` itself (a flat folder)."""
    for dirs in (OASIS_DIRS, HIPMRI_DIRS):
        if os.path.isdir(os.path.join(root, dirs[split])):
            return os.path.join(root, dirs[split])
    return root


def other_files(folder, used):
    """The files in `folder` that are not in `used` (notes, masks of another format, ...);
    they are ignored, and listed in the log so nothing is dropped unseen."""
    used = set(used)
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if os.path.join(folder, name) not in used and not os.path.isdir(os.path.join(folder, name))]


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
        image = nibabel.load(path)
        if 0 in image.shape:
            raise DataError(f"{path}: has a zero-size axis (shape {image.shape})")
        array = np.asanyarray(image.dataobj)
    except DataError:
        raise
    except Exception as error:  # nibabel raises many types for broken files
        reason = " ".join(str(error).split())
        raise DataError(f"{path}: cannot read NIfTI ({reason})") from error
    if array.ndim == 4:
        if not 0 <= volume_index < array.shape[3]:
            raise DataError(f"{path}: 4D with {array.shape[3]} volumes, no volume {volume_index}")
        array = array[..., volume_index]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or min(array.shape) == 0:
        raise DataError(f"{path}: expected a 2D slice or 3D volume, got shape {array.shape}")
    if not np.isfinite(array).any():
        raise DataError(f"{path}: no finite values (all NaN or Inf)")
    array = normalize_intensity(array)
    if array.ndim == 2:
        return [array]
    return list(np.moveaxis(array, slice_axis, 0))


def nifti_shape(path, slice_axis=-1):
    """The 2D shape of the slices in a NIfTI file, read from its header alone."""
    return nifti_header_slices(path, slice_axis)[1]


def nifti_header_slices(path, slice_axis=-1):
    """How many 2D slices a NIfTI file holds and their shape, read from its header alone."""
    import nibabel

    shape = list(nibabel.load(path).shape)
    if len(shape) == 4:
        shape = shape[:3]
    if len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    count = shape.pop(slice_axis) if len(shape) == 3 else 1
    return count, tuple(shape)


def decode_png(path):
    """One image file (PNG, JPEG or BMP) as an (H, W, 1) float32 tensor in [0, 1]."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=1, expand_animations=False)
    return tf.cast(image, tf.float32) / 255.0


def default_image_size(source, multiple, slice_axis=-1):
    """A target size taken from the data: the largest height and width of the training
    slices, rounded up to a multiple of the model's downsampling factor."""
    files = source.files["train"]
    if source.is_png:
        readable, _ = readable_images(files[:16])  # the PNG layouts hold slices of one size
        shapes = [tuple(decode_png(path).shape[:2]) for path in readable[:1]]
    else:
        shapes = []
        for path in files:
            try:
                shape = nifti_shape(path, slice_axis)
            except Exception:  # a broken file: skipped, with its reason, when the split is cached
                continue
            if len(shape) == 2 and min(shape) > 0:
                shapes.append(shape)
    if not shapes:
        raise DataError(f"--data {source.root}: cannot read the size of any training slice; "
                        f"give --image-size")
    height = max(s[0] for s in shapes)
    width = max(s[1] for s in shapes)
    return (-(-height // multiple) * multiple, -(-width // multiple) * multiple)


# ---------------------------------------------------------------------------
# Decoding every slice of a split once


def fit_to_size(image, image_size):
    """Resize an (H, W, 1) slice to `image_size`, keeping aspect ratio and zero padding."""
    return tf.image.resize_with_pad(image, image_size[0], image_size[1], antialias=True)


def readable_images(files):
    """Split image files into those TensorFlow can read and decode, and (path, reason)
    for the rest (truncated or corrupt files, non-images, unreadable or dangling paths)."""
    def shape(path):
        return path, tf.shape(decode_png(path))

    paths = tf.data.Dataset.from_tensor_slices(list(files))
    decoded = paths.map(tf.autograph.experimental.do_not_convert(shape),
                        num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    good = {path.numpy().decode() for path, size in decoded if min(size.numpy()) > 0}
    bad = []
    for path in files:
        if path not in good:
            try:
                decode_png(path)
                reason = "has no pixels"
            except tf.errors.OpError as error:
                reason = error_reason(error)
            bad.append((path, reason))
    return [f for f in files if f in good], bad


def error_reason(error):
    """The readable part of a TensorFlow error message."""
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    return re.sub(r"\s*\[Op:\w+\].*", "", message.splitlines()[0]).strip() or type(error).__name__


def png_dataset(folder, image_size):
    """Unbatched ((H, W, 1) float32 slice in [0, 1], position) pairs from a folder of PNG
    files, in file order. Files that cannot be decoded are dropped (`readable_images` names
    them). The positions go in as `image_dataset_from_directory`'s labels (in thousandths),
    so a dropped file takes its position with it."""
    import keras

    def read(labels):
        return keras.utils.image_dataset_from_directory(
            folder, labels=labels, label_mode="int" if labels else None, color_mode="grayscale",
            image_size=tuple(image_size), pad_to_aspect_ratio=True, batch_size=None, shuffle=False, verbose=False)

    paths = read(None).file_paths  # the files it reads, in its order
    positions = slice_positions(paths)
    labels = [round(1000 * positions.get(path, UNKNOWN_POSITION)) for path in paths]
    if not labels:
        return read(None).map(lambda image: (image, UNKNOWN_POSITION))
    return read(labels).ignore_errors().map(lambda image, label: (image / 255.0, tf.cast(label, tf.float32) / 1000.0),
                                            num_parallel_calls=tf.data.AUTOTUNE)


def nifti_dataset(files, image_size, slice_axis=-1, volume_index=0, skipped=None):
    """Unbatched ((H, W, 1) float32 slice in [0, 1], position) pairs from NIfTI files, in
    file order (a volume's slices interleaved with the next files').

    Files are read by a nibabel generator, several in parallel through `interleave`.
    A file that cannot be used is skipped and (path, reason) appended to `skipped`."""
    named = slice_positions(files)

    def generate(path):
        path = path.decode()
        try:
            slices = nifti_slices(path, slice_axis, volume_index)
        except DataError as error:
            if skipped is None:
                raise
            skipped.append((path, str(error).removeprefix(f"{path}: ")))
            return
        for index, image in enumerate(slices):
            position = index / (len(slices) - 1) if len(slices) > 1 else named.get(path, UNKNOWN_POSITION)
            yield image[..., None], np.float32(position)

    def read_file(path):
        return tf.data.Dataset.from_generator(
            generate,
            args=(path,),
            output_signature=(tf.TensorSpec(shape=(None, None, 1), dtype=tf.float32),
                              tf.TensorSpec(shape=(), dtype=tf.float32)),
        )

    paths = tf.data.Dataset.from_tensor_slices(list(files))
    dataset = paths.interleave(read_file, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.map(lambda image, position: (fit_to_size(image, image_size), position),
                       num_parallel_calls=tf.data.AUTOTUNE)


def decoded_slices(source, split, image_size, slice_axis=-1, volume_index=0):
    """Every slice of a split, decoded, normalised and resized, with its position, in file
    order, and the files skipped as (path, reason)."""
    files = source.files[split]
    skipped = []
    if not source.is_png:
        return nifti_dataset(files, image_size, slice_axis, volume_index, skipped), skipped
    if source.layout == "oasis":
        dataset = png_dataset(os.path.join(source.root, OASIS_DIRS[split]), image_size)
    else:
        positions = slice_positions(files)
        pairs = (list(files), [positions.get(path, UNKNOWN_POSITION) for path in files])
        dataset = tf.data.Dataset.from_tensor_slices(pairs).map(
            lambda path, position: (fit_to_size(decode_png(path), image_size), position),
            num_parallel_calls=tf.data.AUTOTUNE)
    return naming_unreadable(dataset.ignore_errors(), files, skipped), skipped


def naming_unreadable(dataset, files, skipped):
    """Yield a PNG dataset's (slice, position) pairs (each file decoded once); if fewer came
    out than there are files, find the ones that could not be decoded and add them to
    `skipped` with their reasons (only then is each file decoded a second time)."""
    count = 0
    for pair in dataset:
        count += 1
        yield pair
    if count < len(files):
        skipped.extend(readable_images(files)[1])


def progress_bar(total, unit_name, verbose=True):
    """A keras Progbar that redraws in a terminal and, in a log file, prints one line at the end."""
    import sys

    import keras

    return keras.utils.Progbar(total, unit_name=unit_name, verbose=(1 if sys.stdout.isatty() else 2) if verbose else 0)


# ---------------------------------------------------------------------------
# Reading single files, as `reconstruct` does


def named_slices(files, image_size, slice_axis=-1, volume_index=0):
    """(name, (H, W, 1) [0, 1] slice) for every slice of the files, resized to `image_size`;
    a file that cannot be read is skipped with its reason printed. Volumes give one name
    per slice: `file.nii.gz[K]`."""
    for path in files:
        try:
            if is_png(path):
                slices = [decode_png(path).numpy()[..., 0]]
            else:
                slices = nifti_slices(path, slice_axis, volume_index)
        except (DataError, tf.errors.OpError) as error:
            reason = error_reason(error) if isinstance(error, tf.errors.OpError) else str(error)
            print(f"skipped {path}: {reason}", flush=True)
            continue
        for index, image in enumerate(slices):
            name = os.path.basename(path) + (f"[{index}]" if len(slices) > 1 else "")
            yield name, fit_to_size(np.asarray(image)[..., None], image_size).numpy()
