"""Hash of the C++ sources; compiled into the extension so a stale build can be detected.

Standalone (standard library only): setup.py loads this file by path before install.
"""
import hashlib
from pathlib import Path


def source_hash(csrc: Path) -> str:
    """First 16 hex digits of sha256 over every .cpp/.h file name and content in ``csrc``."""
    digest = hashlib.sha256()
    for path in sorted(Path(csrc).iterdir()):
        if path.suffix in {".cpp", ".h"}:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
