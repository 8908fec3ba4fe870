"""A run's ``output_dir``: usable, not another run's, locked while a run writes to it, resumable from an intact
checkpoint.

* :func:`check_output_dir` (the validation pass): the directory (or the nearest existing parent) must be a
  writable directory; it must not hold a live run's lock; it must not hold an earlier run's outputs unless
  ``resume=true``.
* :class:`RunLock`: ``<output_dir>/.dataeff.lock`` holds the pid and host of the run writing there, created
  atomically; a lock whose process is gone (same host) is stale and taken over with a warning.
* :func:`choose_checkpoint`: the newest intact checkpoint of ``<output_dir>/checkpoints`` (CRC-checked and
  unpickled), with a warning naming every corrupt newer one.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

from lightning_dataeff.recipes.config import RecipeError, _one_line

__all__ = ["RUN_OUTPUTS", "LOCK_NAME", "check_writable_dir", "check_output_dir", "RunLock", "read_lock",
           "choose_checkpoint", "checkpoint_problem"]

#: What a run writes into its ``output_dir``: present means an earlier run wrote there.
RUN_OUTPUTS = ("config.yaml", "metrics.csv", "summary.json", "checkpoints", "logs")
LOCK_NAME = ".dataeff.lock"
_CHECKPOINT_DIR = "checkpoints"


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(directory: Path) -> str | None:
    """None when a file can be created in ``directory``, else why not (tried for real: permissions, read-only
    mounts and quotas all show)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".dataeff-probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or _one_line(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def read_lock(out: Path) -> dict[str, Any] | None:
    """The lock of ``out`` (``{"pid", "host", "since"}``), or None when there is none."""
    try:
        text = (out / LOCK_NAME).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}  # being written right now, or garbage
    return info if isinstance(info, dict) else {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(out: Path) -> str | None:
    """Who holds ``out``'s lock, when a live run (or one on another host) does; None for no lock or a stale one."""
    info = read_lock(out)
    if info is None:
        return None
    path = out / LOCK_NAME
    if not info:  # unreadable: a lock being written is fresh, an old unreadable one is garbage
        age = time.time() - path.stat().st_mtime if path.exists() else 1e9
        return f"a run that is starting (lock file {path})" if age < 10 else None
    host, pid = info.get("host"), info.get("pid")
    if host != socket.gethostname():
        return f"pid {pid} on host {host} (lock file {path}; delete it if that run is gone)"
    return f"pid {pid} (lock file {path})" if _alive(pid) else None


def check_writable_dir(path: str | Path, key: str) -> Path:
    """``path`` is, or can be created as, a directory we can write to; ``RecipeError`` naming ``key`` otherwise.
    Nothing is created (a probe file in the nearest existing directory is created and removed)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise RecipeError(f"invalid value for '{key}': {out} is a file, not a directory")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise RecipeError(f"invalid value for '{key}': {out} cannot be created: {base} is a file")
    problem = _writable(base)
    if problem is not None:
        raise RecipeError(f"invalid value for '{key}': cannot write to {base} ({problem})")
    return out


def check_output_dir(output_dir: str | Path, *, resume: bool, key: str = "output_dir") -> Path:
    """``output_dir`` usable by a new run (``RecipeError`` naming ``key`` otherwise); nothing is created."""
    out = check_writable_dir(output_dir, key)
    if not out.is_dir():
        return out
    holder = _holder(out)
    if holder is not None:
        raise RecipeError(f"invalid value for '{key}': {out} is in use by another run, {holder}; wait for it to "
                          "finish or choose another output_dir")
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if found and not resume:
        raise RecipeError(f"invalid value for '{key}': {out} holds an earlier run ({', '.join(found)}); continue it "
                          "with resume=true or choose a new output_dir")
    return out


class RunLock:
    """``with RunLock(out):`` holds ``out``'s lock for the duration (created atomically; a stale lock is taken
    over with a warning, a live one raises :class:`RecipeError`)."""

    def __init__(self, out: str | Path, key: str = "output_dir") -> None:
        self.out, self.key = Path(out), key
        self.path = self.out / LOCK_NAME
        self._held = False

    def acquire(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(self.out)
                if holder is not None:
                    raise RecipeError(f"invalid value for '{self.key}': {self.out} is in use by another run, "
                                      f"{holder}; wait for it to finish or choose another output_dir") from None
                warnings.warn(f"removing the stale lock {self.path} (its run is gone)", stacklevel=3)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
            self._held = True
            return
        raise RecipeError(f"invalid value for '{self.key}': cannot lock {self.out} (another run keeps taking it)")

    def release(self) -> None:
        if self._held:
            info = read_lock(self.out)
            if info and info.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def checkpoint_problem(path: Path) -> tuple[str | None, int | None]:
    """``(None, global_step)`` for an intact Lightning checkpoint, else ``(why, None)``.

    Intact: every member's CRC matches (``torch.save`` writes a zip archive with CRCs) and it unpickles to a
    mapping with ``global_step`` and ``state_dict`` (tensors memory-mapped, not read)."""
    import torch

    try:
        if path.stat().st_size == 0:
            return "empty file", None
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
        if broken is not None:
            return f"CRC mismatch in {broken}", None
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except zipfile.BadZipFile:
        return "not a checkpoint archive (truncated or overwritten)", None
    except Exception as exc:  # OSError, RuntimeError, pickle errors
        return f"{type(exc).__name__}: {_one_line(exc)[:120]}", None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a Lightning checkpoint (no state_dict / global_step)", None
    return None, int(ckpt["global_step"])


def choose_checkpoint(out: Path) -> Path | None:
    """The newest intact checkpoint of ``out/checkpoints`` (``last.ckpt`` and ``step<N>.ckpt``), or None when the
    folder holds none. Corrupt ones are named in one warning; only corrupt ones raise :class:`RecipeError`."""
    folder = out / _CHECKPOINT_DIR
    candidates = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not candidates:
        return None
    intact, corrupt = [], []
    for path in candidates:
        why, step = checkpoint_problem(path)
        if why is None:
            intact.append((step, path.name == "last.ckpt", path))
        else:
            corrupt.append(f"{path} ({why})")
    if not intact:
        raise RecipeError(f"invalid value for 'resume': no intact checkpoint to resume from: {'; '.join(corrupt)}; "
                          "start over in a new output_dir")
    step, _, best = max(intact)
    if corrupt:
        warnings.warn(f"corrupt checkpoint(s) {'; '.join(corrupt)}: resuming from {best} (step {step}) instead",
                      stacklevel=2)
    return best
