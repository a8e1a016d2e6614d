"""Files: JSON fields checked with one-line errors naming the file and field; writes that never leave a partial
file."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
         dict: "an object"}


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_fields(config: Mapping, example: Mapping, where: str | Path) -> None:
    """Raise ValueError unless every field of `config` that `example` has (not None there) has the example's
    type; list fields also the type of the example's first element. `where` names the file."""
    for key, expected in example.items():
        value = config.get(key)
        if expected is None or value is None:
            continue
        kind = type(expected)
        item = type(expected[0]) if isinstance(expected, list) and expected else None
        ok = _is(value, kind) and (item is None or all(_is(v, item) for v in value))
        if not ok:
            what = KINDS.get(kind, kind.__name__) + (f" of {KINDS[item].split(' ', 1)[1]}s" if item else "")
            raise ValueError(f"{where}: field {key!r} must be {what}, got {value!r}; fix or re-download this file.")


def write_atomic(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, renamed into place once complete:
    a failed write (full disk, interruption) leaves no partial file and any old file untouched. Without
    `overwrite`, an existing file raises FileExistsError. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it or choose a new name.")
    tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp"))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, FileExistsError):
            raise _write_error(path, err) from None
        raise
    return path


def _write_error(path: Path, err: OSError) -> OSError:
    return OSError(f"cannot write {path} ({err.strerror or err}); nothing was written: free some space or "
                   "choose another place.")


def _link(tmp: str, path: Path) -> None:
    """Rename `tmp` to `path` unless `path` exists (a hard link fails if it appeared meanwhile)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it or choose a new name.") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
            raise
        os.replace(tmp, path)  # a file system without hard links
        return
    os.unlink(tmp)
