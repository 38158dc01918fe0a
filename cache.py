"""The slice cache: each split decoded once into TFRecord shards, every epoch read back from them.

`cache_split` runs `data.decoded_slices` over a split once and stores its slices as uint16
pixels (exact for 8-bit PNGs, within 1e-5 for NIfTI) in shards of about 32 MB, with a
manifest naming the shards, the slice count, each slice's position in its volume
(`data.slice_positions`, -1 where unknown) and the files skipped with their reasons. The
cache folder is keyed by every file's path, size and modification time, the image size
and the NIfTI slicing settings, so any run of the same files at the same size reuses it.
`cached_dataset` reads a split back as batched, prefetched float32 (B, H, W, 1) slices: in
a new shard order each epoch, interleaved, through a shuffle buffer, so NIfTI files are not
decoded in Python again and memory stays flat however many slices there are.
"""

import hashlib
import json
import os
import tempfile

import numpy as np
import tensorflow as tf

import data
from data import DataError, decoded_slices, nifti_header_slices
from files import read_json, write_json

SHUFFLE_BUFFER = 512  # slices
SHARD_BYTES = 32 * 2**20  # target size of one cache shard
CACHE_VERSION = 2  # 2: the manifest holds each slice's position
# Per process, so several workers writing one shared cache never write the same file; each
# then renames identical shards into place.
PARTIAL_SHARD = f".partial-{os.getpid()}.tfrecord"


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
        manifest = read_json(manifest_path)
        manifest["shards"] = [os.path.join(folder, name) for name in manifest["shards"]]
        return manifest

    os.makedirs(folder, exist_ok=True)
    dataset, skipped = decoded_slices(source, split, image_size, slice_axis, volume_index)
    height, width = image_size
    per_shard = max(1, SHARD_BYTES // (2 * height * width))
    shards, positions, count, writer = [], [], 0, None
    progress = None
    if verbose:
        print(f"caching {split}: decoding each slice once into the cache", flush=True)
        progress = data.progress_bar(count_slices(source, split, slice_axis), "slice")
    for image, position in dataset:
        if count % per_shard == 0:
            if writer:
                finish_shard(writer, folder, shards)
            writer = (tf.io.TFRecordWriter(os.path.join(folder, PARTIAL_SHARD)), len(shards))
        pixels = np.round(np.clip(image.numpy()[..., 0], 0.0, 1.0) * 65535).astype("<u2")
        writer[0].write(pixels.tobytes())
        positions.append(round(float(position), 4))
        count += 1
        if progress and count % 64 == 0 and count < progress.target:
            progress.update(count)
    if writer:
        finish_shard(writer, folder, shards)
    if progress:
        progress.target = count  # skipped files hold fewer slices than their headers said
        progress.update(count, finalize=True)
    if not count:
        reasons = "; ".join(f"{os.path.basename(p)}: {r}" for p, r in skipped[:3])
        raise DataError(f"--data {source.root}: no usable slices in the {split} split "
                        f"({len(skipped)} of {len(source.files[split])} files skipped{': ' + reasons if reasons else ''})")
    manifest = {"split": split, "slices": count, "image_size": [height, width], "shards": shards,
                "positions": positions, "files": len(source.files[split]),
                "skipped": [list(item) for item in sorted(skipped)]}
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


def count_slices(source, split, slice_axis=-1):
    """How many slices a split's files hold, from the NIfTI headers alone (a broken file
    counts none); PNG files hold one each."""
    if source.is_png:
        return len(source.files[split])
    total = 0
    for path in source.files[split]:
        try:
            total += nifti_header_slices(path, slice_axis)[0]
        except Exception:  # skipped, with its reason, when it is decoded
            continue
    return total


def cached_dataset(manifest, batch_size, shift=0.0, shuffle=False, seed=0):
    """Batched (B, H, W, 1) float32 slices read back from a split's cache.

    Shuffling reads the shards in a new random order each epoch, interleaved, through a
    shuffle buffer of raw records, so memory stays flat however many slices there are.
    Unshuffled, the shards are read one after another: the slices come in cache order, the
    order of `manifest["positions"]` (which code grids and evaluation rely on)."""
    height, width = manifest["image_size"]
    shards = tf.data.Dataset.from_tensor_slices(manifest["shards"])
    if shuffle:
        shards = shards.shuffle(len(manifest["shards"]), seed=seed, reshuffle_each_iteration=True)
        records = shards.interleave(tf.data.TFRecordDataset, cycle_length=min(8, len(manifest["shards"])),
                                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        records = tf.data.TFRecordDataset(shards)
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
