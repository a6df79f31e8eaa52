# Copyright (c) medcl contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""One training run per checkpoint folder: a lock file that names the run holding the folder."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time

from medcl.errors import MedclInputError

__all__ = ["LOCK_FILE", "RunDirLock", "run_job", "run_owner"]

LOCK_FILE = ".medcl_run.lock"
logger = logging.getLogger(__name__)


def run_owner() -> int:
    """The process that owns a run: the ``torchrun`` agent (parent) for its ranks, so that they share one lock;
    else this process."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()


def run_job() -> str | None:
    """The ``torchrun`` job this process is a rank of, the same on every node: rendezvous id and the master's address
    (``TORCHELASTIC_RUN_ID@MASTER_ADDR:MASTER_PORT``); ``None`` outside ``torchrun``."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    return f"{run_id}@{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunDirLock:
    """
    ``<directory>/.medcl_run.lock`` while a run writes checkpoints there: ``{"pid", "host", "started", "command"}``.

    :meth:`acquire` creates the file (exclusively) or refuses with one message when another live process on this host
    holds it, or a process on another host (where liveness cannot be checked: delete the file if no run is alive
    there). A lock left by a dead process (a killed run) is taken over with a warning, so ``--resume true`` after
    SIGKILL works. The ranks of one ``torchrun`` share the lock: on one node through their agent's pid
    (:func:`run_owner`), across nodes that write to one shared folder through the job (:func:`run_job`).
    :meth:`release` (also at interpreter exit) removes the file if it is still this owner's (under ``torchrun``: rank 0
    removes it).

    Args:
        directory: the run's checkpoint folder (created when missing).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_FILE)
        self.owner = run_owner()
        self.host = socket.gethostname()
        self.job = run_job()
        self.held = False

    def _record(self) -> dict:
        return {
            "pid": self.owner,
            "host": self.host,
            "job": self.job,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": _cmd(),
        }

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable (e.g. a write cut short): treated as stale

    def acquire(self) -> None:
        """Take the folder for this run.

        Raises:
            MedclInputError: another live run (or one on another host) holds the folder.
        """
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(3):  # create exclusively; on a stale lock, replace it and try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._read()
                if held is None:
                    continue
                if self._holds(held):
                    self.held = True
                    return
                self._refuse_if_alive(held)
                logger.warning(f"{self.path}: taking over the lock of a run that is no longer alive ({held}).")
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            self.held = True
            atexit.register(self.release)
            return
        raise MedclInputError(f"{self.path}: could not take the run lock; remove the file if no run uses the folder.")

    def _holds(self, held: dict) -> bool:
        if self.job is not None and held.get("job") == self.job:
            return True
        return held.get("pid") == self.owner and held.get("host") == self.host

    def _refuse_if_alive(self, held: dict) -> None:
        pid, host = held.get("pid"), held.get("host")
        if not isinstance(pid, int):
            return
        if host == self.host and not _alive(pid):
            return
        where = f"pid {pid}" + ("" if host == self.host else f" on host {host}")
        raise MedclInputError(
            f"{self.directory}: another run ({where}, started {held.get('started', '?')}: {held.get('command', '?')}) "
            "is writing checkpoints to this folder. Wait for it to finish, stop it, or give this run another "
            "--bundle_root / --ckpt_dir"
            + ("" if host == self.host else f"; if no run is alive on {host}, delete {self.path}")
            + "."
        )

    def release(self) -> None:
        """Remove the lock file if this owner holds it."""
        if not self.held:
            return
        held = self._read()
        if held is not None and self._holds(held) and (self.owner == os.getpid() or os.environ.get("RANK") == "0"):
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False


def _cmd() -> str:
    text = " ".join(sys.argv)
    return text if len(text) <= 300 else text[:297] + "..."
