"""The run folder, as later commands find it: its config.json and saved models, checked
with an error that names the flag and the folder.

`driver.py` writes a run folder (models, config.json, metrics, figures, logs); `reconstruct`,
`sample`, `evaluate` and `--resume` read it back through these functions, so each check is
made in one place.
"""

import os

# Imported by driver.py before TensorFlow may be (quiet.py must come first), so `data`,
# which imports TensorFlow, is imported where it is used.


def require_folder(path, flag="--data"):
    from data import DataError

    if not os.path.isdir(path):
        raise DataError(f"{flag} {path}: no such folder")
    return path


# Settings added after a run may have been made, with the value that run used: a config.json
# without them still resumes and reloads as the run it was (two levels, no condition blocks).
EARLIER_SETTINGS = dict(pcnn_middle_codes=0, pcnn_condition_blocks=0, pcnn_top_temperature=1.0,
                        pcnn_bottom_temperature=1.0, pcnn_top_shift=0, pcnn_top_dropout=0.0,
                        pcnn_middle_layers=0, pcnn_precision="float32", pcnn_weights_ema=0.0,
                        pcnn_slip_levels="both", pcnn_condition_slips=0.0, pcnn_position_bins=0)


def load_config(run_dir, flag="--run"):
    """A run folder's config.json, as a dict (settings it predates filled in from
    EARLIER_SETTINGS)."""
    from data import DataError
    from files import read_json

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise DataError(f"{flag} {run_dir}: no config.json there (not a run folder)")
    return {**EARLIER_SETTINGS, **read_json(path)}


def load_model(run_dir, name, required=True):
    """RUN/<name>, loaded with plain keras.models.load_model (None if it is missing and
    not `required`)."""
    import keras

    import hierarchy  # noqa: F401  (importing registers the saved classes with Keras)
    import pixelcnn  # noqa: F401
    import vqvae  # noqa: F401
    from data import DataError

    path = os.path.join(run_dir, name)
    if os.path.exists(path):
        return keras.models.load_model(path)
    if required:
        hint = " (was the run trained with --pcnn-epochs 0?)" if name == "pixelcnn.keras" else ""
        raise DataError(f"--run {run_dir}: no {name}{hint}")
    return None


def input_files(folder, split="test"):
    """(folder, its PNG and NIfTI files) for a command's --data: `folder` itself, or its
    `split` folder if it has the OASIS or HipMRI split folders; none is an error."""
    import data

    folder = data.split_folder(require_folder(folder), split)
    paths = data.list_images(folder)
    if not paths:
        raise data.DataError(f"--data {folder}: no PNG or NIfTI files")
    return folder, paths
