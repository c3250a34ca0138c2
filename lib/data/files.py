"""Listing real dataset folders as users have them: hidden and system entries (".*", "@*", "__MACOSX", made by
macOS, Synology NAS, Jupyter, thumbnailers) are never classes, domains or images. Every loader lists folders
through these functions, so one rule holds for every layout; `fingerprint` is what the runner's store keys a
dataset on disk by."""
import hashlib
import os
import warnings
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SYSTEM_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


def is_system(name):
    """Whether a folder or file name is a hidden or system entry, never data."""
    return name.startswith((".", "@")) or name in SYSTEM_NAMES


def subfolders(path, warn=True, skipped=None):
    """The sorted data folders of `path` (Paths); hidden and system folders are skipped, with one warning that
    names them (or, given a list `skipped`, appended to it for the caller's one warning)."""
    entries = sorted(p for p in Path(path).iterdir() if p.is_dir())
    _skip(path, [p for p in entries if is_system(p.name)], warn, skipped)
    return [p for p in entries if not is_system(p.name)]


def image_files(path, warn=True, skipped=None):
    """The sorted image files of a folder (by suffix, IMAGE_SUFFIXES), hidden and system files left out (e.g.
    macOS's "._photo.jpg" resource forks, which carry an image suffix but are not images), said as subfolders
    says it."""
    entries = [p for p in sorted(Path(path).iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    _skip(path, [p for p in entries if is_system(p.name)], warn, skipped)
    return [p for p in entries if not is_system(p.name)]


def _skip(path, entries, warn, skipped):
    if skipped is not None:
        skipped.extend(entries)
    elif entries and warn:
        warnings.warn(f"{path}: skipped hidden or system entries {[p.name for p in entries]} (not data).",
                      stacklevel=3)


def warn_skipped(root, skipped):
    """One warning for the hidden and system entries skipped under root (`skipped`: Paths), the first ten named."""
    if skipped:
        names = sorted(str(Path(p).relative_to(root)) for p in skipped)
        warnings.warn(f"{root}: skipped {len(names)} hidden or system entries (not data): {names[:10]}"
                      f"{' ...' if len(names) > 10 else ''}", stacklevel=3)


def fingerprint(*imagesets):
    """A fingerprint of image files on disk (ImageSets whose images are paths; None and ImageSets of generated
    tensors add nothing): the absolute folder that holds them all, their number, and the sha256 of every file's path
    under it, size, modification time, label and domain, and of the class names. Renaming, replacing, adding,
    removing or touching a file, another root (a relative data root read from another folder) or other classes all
    change it; reading no pixels, it costs one stat a file."""
    parts = [part for part in imagesets if part is not None and not hasattr(part.images, "dtype")]  # not tensors
    paths = [os.path.abspath(p) for part in parts for p in part.images]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else None
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(list(part.classnames)).encode())
        for path, label, domain in zip(part.images, part.labels.tolist(), part.domains):
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(os.path.abspath(path), root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0"
                          f"{label}\0{domain}\n".encode())
        digest.update(b"\1")  # one part ends: a file moved from train to test changes the fingerprint
    return dict(root=root, files=len(paths), sha256=digest.hexdigest())
