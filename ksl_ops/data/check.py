"""Every image of a dataset checked before a run uses it, so that a bad file stops the run at once.

A damaged image found by the loader stops training in the middle of an epoch (or, for a query or
gallery image, only at the evaluation after training), with a traceback that names the file only
inside it. :func:`check_images` opens and decodes every image first and raises one ValueError that
lists the bad files and what is wrong with each:

* missing, not a regular file, or unreadable;
* empty (0 bytes), or bytes that are not an image PIL can read (random data, a text file);
* truncated or corrupt: the image is decoded, so a cut-off JPEG or PNG is found (JPEGs are decoded
  at 1/8 scale, which reads the whole compressed stream at a fraction of the cost);
* a "decompression bomb": a header declaring more pixels than PIL's ``Image.MAX_IMAGE_PIXELS``
  (about 89 million; a Re-ID crop has a few tens of thousands).

A bad image is an error, not a warning-and-skip, on purpose: a split silently shortened by a few
files gives different numbers without any sign (the parsers refuse a malformed file name for the
same reason). Cost: decoding a 128x64 crop takes well under a millisecond, done on a few threads; the
default synthetic set (about 1.6k images) takes a fraction of a second, Market-1501 (36k) seconds.
"""
from __future__ import annotations

import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

from .base import Item

__all__ = ["check_image", "check_images", "MAX_LISTED"]

MAX_LISTED = 5  # bad files named in the message (the count says how many there are in all)


def check_image(path: str) -> Optional[str]:
    """None if ``path`` is an image the loaders can read, else what is wrong with it (one phrase)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size == 0:
        return "is empty (0 bytes)"
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"declares too many pixels for an image crop ({exc})"
    except UnidentifiedImageError:
        return f"is not an image PIL can read ({st.st_size} bytes)"
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        return f"cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def check_images(splits: Sequence[Tuple[str, Iterable[Item]]], dataset: str, when: str = "training",
                 threads: Optional[int] = None) -> int:
    """Check every image of ``splits`` (``(label, items)`` pairs, e.g. ``[("train", ds.train)]``);
    returns how many were checked. ValueError naming the dataset, the first MAX_LISTED bad files (with
    their split and what is wrong) and how many there are, if any image cannot be used."""
    paths: List[str] = []
    split_of = {}
    for label, items in splits:
        for path, _, _ in items:
            if path not in split_of:
                split_of[path] = label
                paths.append(path)
    n = threads or min(8, os.cpu_count() or 1)
    if n > 1 and len(paths) > 64:
        with ThreadPoolExecutor(max_workers=n) as pool:
            problems = list(pool.map(check_image, paths, chunksize=64))
    else:
        problems = [check_image(p) for p in paths]
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    if bad:
        listed = "; ".join(f"{p!r} ({split_of[p]}) {why}" for p, why in bad[:MAX_LISTED])
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise ValueError(f"{dataset}: {len(bad)} of its {len(paths)} images cannot be used, found before "
                         f"{when}: {listed}{more}. Replace or remove them")
    return len(paths)
