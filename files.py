"""Writing files so that nothing already written is lost or half-written.

Every file the project writes (models, figures, metrics, CSV, cache manifests, samples)
goes through `atomic_write`: it is written under a temporary name in the same folder and
renamed over the real one in one step, so a run killed mid-write, or a full disk, leaves the
previous file intact and never a half-written one under its real name.
`remove_stale_temporaries` clears what a killed process left under temporary names.
"""

import csv
import json
import os
import pathlib
import tempfile

UMASK = os.umask(0o022)  # read the process umask (the only way is to set it), then put it back
os.umask(UMASK)


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


def remove_stale_temporaries(folder):
    """Remove what a killed process left half-written in `folder`: `atomic_write`'s
    temporary files and unpublished checkpoints (never a file under its real name)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".tmp-") or (name.startswith(".") and name.endswith("-partial.keras")):
                os.remove(os.path.join(folder, name))


def write_csv(path, header, rows):
    def write(temporary):
        with open(temporary, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, data):
    def write(temporary):
        with open(temporary, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)
