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

Each split is decoded once, on its first use, into a cache of TFRecord shards
(`cache_split`); every epoch then reads the shards (`cached_dataset`), so NIfTI files are
not decoded in Python again and memory stays flat however many slices there are.

Bad input: a file that cannot be used (truncated or corrupt, not an image, unreadable, all
NaN, a zero-size axis) is skipped, and named with its reason in the log and the cache's
manifest; one bad file among thousands should not end a run. A data folder that cannot be
used (missing, empty, a missing split folder, a split with no usable file) stops the run
with a `DataError` before training starts.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import tempfile

import numpy as np
import tensorflow as tf

SPLITS = ("train", "validate", "test")
OASIS_DIRS = {split: f"keras_png_slices_{split}" for split in SPLITS}
HIPMRI_DIRS = {split: f"keras_slices_{split}" for split in SPLITS}
PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
PERCENTILES = (0.5, 99.5)
SHUFFLE_BUFFER = 512  # slices
SHARD_BYTES = 32 * 2**20  # target size of one cache shard
CACHE_VERSION = 1
# Per process, so several workers writing one shared cache never write the same file; each
# then renames identical shards into place.
PARTIAL_SHARD = f".partial-{os.getpid()}.tfrecord"
UMASK = os.umask(0o022)  # read the process umask (the only way is to set it), then put it back
os.umask(UMASK)


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
    """Unbatched (H, W, 1) float32 slices in [0, 1] from a folder of PNG files, in file
    order. Files that cannot be decoded are dropped (`readable_images` names them)."""
    import keras

    dataset = keras.utils.image_dataset_from_directory(
        folder,
        labels=None,
        color_mode="grayscale",
        image_size=tuple(image_size),
        pad_to_aspect_ratio=True,
        batch_size=None,
        shuffle=False,
        verbose=False,
    )
    return dataset.ignore_errors().map(lambda image: image / 255.0, num_parallel_calls=tf.data.AUTOTUNE)


def nifti_dataset(files, image_size, slice_axis=-1, volume_index=0, skipped=None):
    """Unbatched (H, W, 1) float32 slices in [0, 1] from NIfTI files, in file order.

    Files are read by a nibabel generator, several in parallel through `interleave`.
    A file that cannot be used is skipped and (path, reason) appended to `skipped`."""

    def generate(path):
        path = path.decode()
        try:
            slices = nifti_slices(path, slice_axis, volume_index)
        except DataError as error:
            if skipped is None:
                raise
            skipped.append((path, str(error).removeprefix(f"{path}: ")))
            return
        for image in slices:
            yield image[..., None]

    def read_file(path):
        return tf.data.Dataset.from_generator(
            generate,
            args=(path,),
            output_signature=tf.TensorSpec(shape=(None, None, 1), dtype=tf.float32),
        )

    paths = tf.data.Dataset.from_tensor_slices(list(files))
    dataset = paths.interleave(read_file, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.map(lambda image: fit_to_size(image, image_size), num_parallel_calls=tf.data.AUTOTUNE)


def decoded_slices(source, split, image_size, slice_axis=-1, volume_index=0):
    """Every slice of a split, decoded, normalised and resized, in file order, and the
    files skipped as (path, reason)."""
    files = source.files[split]
    skipped = []
    if source.is_png:
        files, skipped = readable_images(files)
        if source.layout == "oasis":
            dataset = png_dataset(os.path.join(source.root, OASIS_DIRS[split]), image_size)
        else:
            dataset = tf.data.Dataset.from_tensor_slices(files).map(
                lambda path: fit_to_size(decode_png(path), image_size), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        dataset = nifti_dataset(files, image_size, slice_axis, volume_index, skipped)
    return dataset, skipped


# ---------------------------------------------------------------------------
# The slice cache: each split decoded once into TFRecord shards


def cache_key(source, split, image_size, slice_axis, volume_index):
    """A digest of everything a split's cached slices depend on: the files (path, size and
    modification time), the target size, the NIfTI slicing settings and the format."""
    digest = hashlib.sha1(json.dumps([CACHE_VERSION, source.layout, list(image_size), slice_axis, volume_index]).encode())
    for path in source.files[split]:
        try:
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{os.path.abspath(path)}|missing\n".encode())
    return digest.hexdigest()[:16]


def cache_split(source, split, image_size, cache_dir, slice_axis=-1, volume_index=0, verbose=True):
    """Decode every slice of a split once and store it in `cache_dir` as TFRecord shards of
    uint16 pixels (exact for 8-bit PNGs, within 1e-5 for NIfTI). Returns the manifest:
    shard paths, slice count and skipped files. A cache already written for the same files
    and settings is reused; shards and manifest are written atomically, so a killed run
    leaves no cache that looks complete."""
    folder = os.path.join(cache_dir, f"{split}-{cache_key(source, split, image_size, slice_axis, volume_index)}")
    manifest_path = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest["shards"] = [os.path.join(folder, name) for name in manifest["shards"]]
        return manifest

    os.makedirs(folder, exist_ok=True)
    dataset, skipped = decoded_slices(source, split, image_size, slice_axis, volume_index)
    height, width = image_size
    per_shard = max(1, SHARD_BYTES // (2 * height * width))
    shards, count, writer = [], 0, None
    progress = keras_progbar(len(source.files[split]) if source.is_png else None, verbose, f"caching {split}")
    for image in dataset:
        if count % per_shard == 0:
            if writer:
                finish_shard(writer, folder, shards)
            writer = (tf.io.TFRecordWriter(os.path.join(folder, PARTIAL_SHARD)), len(shards))
        pixels = np.round(np.clip(image.numpy()[..., 0], 0.0, 1.0) * 65535).astype("<u2")
        writer[0].write(pixels.tobytes())
        count += 1
        if progress and count % 64 == 0:
            progress.update(count)
    if writer:
        finish_shard(writer, folder, shards)
    if progress:
        progress.update(count, finalize=True)
    if not count:
        reasons = "; ".join(f"{os.path.basename(p)}: {r}" for p, r in skipped[:3])
        raise DataError(f"--data {source.root}: no usable slices in the {split} split "
                        f"({len(skipped)} of {len(source.files[split])} files skipped{': ' + reasons if reasons else ''})")
    manifest = {"split": split, "slices": count, "image_size": [height, width], "shards": shards,
                "files": len(source.files[split]), "skipped": [list(item) for item in sorted(skipped)]}
    write_json(manifest_path, manifest)
    manifest["shards"] = [os.path.join(folder, name) for name in shards]
    return manifest


def finish_shard(writer, folder, shards):
    """Close the shard being written and give it its final name."""
    record_writer, index = writer
    record_writer.close()
    name = f"shard-{index:05d}.tfrecord"
    os.replace(os.path.join(folder, PARTIAL_SHARD), os.path.join(folder, name))
    shards.append(name)


def atomic_write(path, write):
    """Call `write(temporary_path)`, then move the result to `path` in one step."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = "".join(pathlib.Path(path).suffixes)  # writers such as nibabel go by the suffix
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~UMASK)  # mkstemp makes owner-only files; give the usual mode
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path, data):
    def write(temporary):
        with open(temporary, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def keras_progbar(total, verbose, name):
    if not verbose:
        return None
    import keras

    print(f"{name}: decoding each slice once into the cache", flush=True)
    return keras.utils.Progbar(total, unit_name="slice")


def cached_dataset(manifest, batch_size, shift=0.0, shuffle=False, seed=0):
    """Batched (B, H, W, 1) float32 slices read back from a split's cache.

    Shuffling reads the shards in a new random order each epoch, interleaved, through a
    shuffle buffer of raw records, so memory stays flat however many slices there are."""
    height, width = manifest["image_size"]
    shards = tf.data.Dataset.from_tensor_slices(manifest["shards"])
    if shuffle:
        shards = shards.shuffle(len(manifest["shards"]), seed=seed, reshuffle_each_iteration=True)
    records = shards.interleave(tf.data.TFRecordDataset, cycle_length=min(8, len(manifest["shards"])),
                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    records = records.apply(tf.data.experimental.assert_cardinality(manifest["slices"]))
    if shuffle:
        records = records.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)

    def parse(record):
        pixels = tf.reshape(tf.io.decode_raw(record, tf.uint16, little_endian=True), (height, width, 1))
        return tf.cast(pixels, tf.float32) / 65535.0 + shift

    dataset = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    options = tf.data.Options()
    # Under MultiWorkerMirroredStrategy, shard by element: there may be fewer files than workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def split_dataset(source, split, image_size, batch_size, shift=0.0, shuffle=False, seed=0,
                  slice_axis=-1, volume_index=0, cache_dir=None, verbose=False):
    """Batched, prefetched float32 (B, H, W, 1) slices of one split, in [shift, 1 + shift],
    decoded once into the cache in `cache_dir` (a temporary folder if None)."""
    manifest = cache_split(source, split, image_size, cache_dir or temporary_cache_dir(), slice_axis,
                           volume_index, verbose)
    return cached_dataset(manifest, batch_size, shift, shuffle, seed)


_TEMPORARY_CACHE = []


def temporary_cache_dir():
    """One temporary cache folder per process, removed when the process exits."""
    if not _TEMPORARY_CACHE:
        _TEMPORARY_CACHE.append(tempfile.TemporaryDirectory(prefix="mri-slice-cache-"))
    return _TEMPORARY_CACHE[0].name


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
