"""Listing real dataset folders as users have them: hidden and system entries (".*", "@*", "__MACOSX", made by
macOS, Synology NAS, Jupyter, thumbnailers) are never classes, domains or images. Every loader lists folders
through these two functions, so one rule holds for every layout."""
import warnings
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SYSTEM_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


def is_system(name):
    """Whether a folder or file name is a hidden or system entry, never data."""
    return name.startswith((".", "@")) or name in SYSTEM_NAMES


def subfolders(path, warn=True):
    """The sorted data folders of `path` (Paths); hidden and system folders are skipped, with one warning that
    names them."""
    entries = sorted(p for p in Path(path).iterdir() if p.is_dir())
    skipped = [p.name for p in entries if is_system(p.name)]
    if skipped and warn:
        warnings.warn(f"{path}: skipped hidden or system folder(s) {skipped} (not data).", stacklevel=2)
    return [p for p in entries if not is_system(p.name)]


def image_files(path):
    """The sorted image files of a folder (by suffix, IMAGE_SUFFIXES), hidden and system files left out (e.g.
    macOS's "._photo.jpg" resource forks, which carry an image suffix but are not images)."""
    return [p for p in sorted(Path(path).iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_system(p.name)]
