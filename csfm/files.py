"""Writing files safely: no torch, no model, so numpy-only modules (metrics, splits) can use it."""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file beside ``path``, then renames it over ``path``:
    a crash leaves the old file or the new one, never half of one. The file gets the mode
    any new file gets (0666 less the umask), also when ``write`` re-creates it with another
    (safetensors writes 0600, as ``tempfile.mkstemp`` does). Missing parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path.parent, f".{path.name}.", ".tmp")
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_file(directory: Path, prefix: str, suffix: str) -> Path:
    """Creates an empty file with a fresh random name in ``directory``, mode 0666 & ~umask."""
    while True:
        path = directory / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
