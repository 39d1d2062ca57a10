"""Images answered as `url`: written to a private temporary folder under unguessable names, served for a bounded
time and removed after it (and with the folder when the server stops)."""

import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9_-]{22}\.(png|jpeg|webp)$")


class FileStore:
    def __init__(self, ttl_seconds: float):
        self.ttl = ttl_seconds
        self.folder = Path(tempfile.mkdtemp(prefix="mlximg-serve-"))

    def put(self, data: bytes, extension: str) -> str:
        """Store `data`; returns its file name."""
        self.purge()
        name = f"{secrets.token_urlsafe(16)}.{extension}"
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.folder / name)  # never a half-written file under a served name
        return name

    def path(self, name: str) -> Path | None:
        """The stored file `name`, or None when unknown or expired."""
        self.purge()
        path = self.folder / name
        return path if _NAME.match(name) and path.is_file() else None

    def purge(self) -> None:
        cutoff = time.time() - self.ttl
        for path in self.folder.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:  # removed by a concurrent purge
                pass

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
