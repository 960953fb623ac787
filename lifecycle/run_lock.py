"""``<run>/run.lock``: one process writes a run at a time; a second is refused, a dead holder's lock taken over."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from callbacks.slurm import slurm_job_id

__all__ = ["RunError", "RunLock"]


class RunError(RuntimeError):
    """A run cannot start as asked; the message names the problem and the fix."""


class RunLock:
    """``<run>/run.lock``: which process writes the run (pid, host, SLURM job, start), so a second one is refused.

    The holder refreshes the file's time every ``heartbeat_s`` seconds from a daemon thread. A lock is stale, and
    taken over, when its process is gone (same host), when it belongs to this SLURM job (a requeued job takes
    over from its own killed predecessor), or when its heartbeat stopped ``stale_after_s`` ago (another host).
    """

    FILENAME = "run.lock"

    def __init__(self, run: Path, heartbeat_s: float = 60.0, stale_after_s: float = 600.0) -> None:
        self.path = Path(run) / self.FILENAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _me() -> dict[str, Any]:
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job_id(), "started": started}

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: no process can be holding it

    def _stale(self, holder: dict[str, Any]) -> bool:
        me = self._me()
        if not holder or (holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]):
            return True
        if holder.get("host") == me["host"]:
            if holder.get("pid") == me["pid"]:
                return True
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError, TypeError):
                return False
            return False
        with contextlib.suppress(FileNotFoundError):
            return time.time() - self.path.stat().st_mtime > self.stale_after_s
        return True

    def acquire(self) -> None:
        # The lock appears with its content in one step (a hard link of a written file, atomic on local disks and
        # NFS), so nobody ever reads a half-written one.
        mine = self.path.with_name(f".{self.FILENAME}.{socket.gethostname()}.{os.getpid()}")
        mine.write_text(json.dumps(self._me()))
        try:
            for _ in range(3):
                try:
                    os.link(mine, self.path)
                except FileExistsError:
                    holder = self.holder()
                    if holder is None or self._stale(holder):
                        with contextlib.suppress(FileNotFoundError):
                            self.path.unlink()
                        continue
                    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
                    raise RunError(
                        f"Run {self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')}"
                        f"{job}, started {holder.get('started')}. Two processes writing one run would mix their "
                        "metrics and checkpoints, so this one was stopped before writing anything. Wait for that "
                        f"process to end, or stop it; if it no longer exists, delete {self.path}."
                    ) from None
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return
        finally:
            mine.unlink(missing_ok=True)
        raise RunError(f"Could not take the lock {self.path}: other processes keep replacing it.")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
