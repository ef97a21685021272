"""The output folder: refuse what cannot be written, stage everything beside it, rename at the end.

A run that fails leaves OUT_DIR as it was (absent, or the previous export): the work happens in a
hidden sibling folder that is renamed into place only after every check passed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from export_errors import InputError


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(out, "output folder is not empty (pass --force to replace it)")
    ancestor = out.resolve().parent  # missing parents are created (like mkdir -p) by staged_output
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(out, f"{ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK):
        raise InputError(out, f"folder {ancestor} is not writable")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is removed."""
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as exc:
        raise InputError(out, f"cannot create a folder in {parent}: {exc.strerror}") from exc
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the export private to its creator
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    backup = None
    if out.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
        backup.rmdir()
        out.rename(backup)
    try:
        work.rename(out)
    except BaseException:
        if backup is not None:
            backup.rename(out)  # the previous export comes back untouched
        shutil.rmtree(work, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
