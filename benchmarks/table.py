"""Print a benchmark's results as an aligned table, and save them as JSON."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def print_table(columns, rows):
    """`columns`: (header, width, format) triples, e.g. ("test SSIM", 9, "{:.3f}"); `rows`:
    lists of values in that order. Text left-aligned in the first column, the rest right-aligned."""
    def line(cells):
        return " ".join(f"{cell:<{width}}" if index == 0 else f"{cell:>{width}}"
                        for index, (cell, (_, width, _)) in enumerate(zip(cells, columns)))

    print(line([header for header, _, _ in columns]))
    for row in rows:
        print(line([pattern.format(value) for value, (_, _, pattern) in zip(row, columns)]))


def save(path, results):
    """Write `results` as JSON to `path` (atomically), if a path was given."""
    if path:
        import files

        files.write_json(path, results)
