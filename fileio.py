"""Atomic file writes shared by every stage.

Each writer fills a temporary file beside the target and then renames it over the target (os.replace), so a
reader, or a rerun after kill -9, sees the old file or the new one, never half of one. The temporary file is
`.<name>.tmp` in the same folder: one left behind by a killed writer is overwritten by the next write of that
file. (Two processes writing the same file at once would share it; no stage does that.)

    from fileio import write_atomic, write_text_atomic, save_nifti_atomic
"""
import gzip
import os
from pathlib import Path

NIFTI_GZIP_LEVEL = 6  # zlib level of .nii.gz files (nibabel's default)


def write_atomic(path, write):
    """Call write(binary file object) on a temporary file next to `path`, then rename it to `path`.
    On any error the temporary file is removed and an existing `path` is left as it was. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path, text):
    """UTF-8 text file, written atomically."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def save_nifti_atomic(img, path, level=NIFTI_GZIP_LEVEL):
    """A nibabel image as .nii.gz (gzip at `level`) or .nii, chosen by the name of `path`, written atomically."""
    data = img.to_bytes()
    if str(path).endswith(".gz"):
        def write(f):
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=level, mtime=0) as gz:
                gz.write(data)
        return write_atomic(path, write)
    return write_atomic(path, lambda f: f.write(data))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use (keeps start-up fast)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=110):
    """A matplotlib figure as PNG (surrounding whitespace trimmed), written atomically, then closed."""
    write_atomic(path, lambda f: fig.savefig(f, dpi=dpi, bbox_inches="tight", format="png"))
    pyplot().close(fig)
    return Path(path)
