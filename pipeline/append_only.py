"""One process's own append-only JSON Lines file: the writer of the run's journal, batch ledger and review labels.

The file is created on the first record under a name no other writer uses (prefix, time, pid, a random
suffix) and opened O_APPEND. Each record is one `write()`: once it returns the line is in the kernel, so a
`kill -9` loses only records not yet written, and a short write (very large records only) is continued at
once. Readers skip a torn last line. With `exclusive`, the writer holds an exclusive `flock` on its file
while it is open, so another process can tell a live file from a finished one.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any


class AppendOnlyFile:
    def __init__(self, folder: Path, prefix: str, exclusive: bool = False) -> None:
        self.folder = folder
        self.prefix = prefix
        self.exclusive = exclusive
        self.path: Path | None = None  # set by the first record, kept after `close`
        self._fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.path = self.folder / f"{self.prefix}-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if self.exclusive:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fd = fd
        return self._fd

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        fd = self._open()
        written = os.write(fd, line)
        while written < len(line):
            written += os.write(fd, line[written:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the flock
            self._fd = None
