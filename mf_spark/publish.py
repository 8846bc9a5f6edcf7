"""Run directories, the output-root lock, atomic publication, retention and rollback.

Layout under ``output.root`` (a POSIX path the driver can rename in; see docs/operations.md)::

    _LOCK                                   JSON: host, pid, start time, run date of the active run
    latest.json                             names the published run consumers read
    runs/dt=2011-12-09/run_id=R/            one directory per run, written only by that run
        user_factors/ item_factors/ recommendations/ ...   tables (Parquet, written by Spark)
        manifest.json                       what the run read, did and measured; status
        _PUBLISHED                          marker: the run is complete and was published
        _SUPERSEDED                         marker: a later run of the same date replaced it

A run is *published* when ``_PUBLISHED`` exists, *failed* when its manifest says
``"status": "failed"`` (kept for inspection), otherwise *partial* (a crashed run, removed by the next
:func:`begin_run`). Every file a consumer reads is written to a temporary name, fsynced and renamed
into place, so a crash at any point (SIGKILL included) leaves ``latest.json`` and the run it names
untouched. The run's tables are fsynced before its manifest, so a power loss cannot leave
``latest.json`` naming tables whose data never reached the disk.

Test-only fault injection: when the environment variable ``MF_SPARK_FAULT`` equals the name passed to
:func:`fault_point`, the process SIGKILLs itself there. Publication honours ``before_manifest``,
``before_published_marker``, ``before_latest`` and ``after_latest``. Never set it in production.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mf_spark.config import parse_iso_date
from mf_spark.errors import ConfigError, LockHeldError, PublishError

log = logging.getLogger(__name__)

LOCK_NAME = "_LOCK"
LATEST_NAME = "latest.json"
MANIFEST_NAME = "manifest.json"
PUBLISHED_MARKER = "_PUBLISHED"
SUPERSEDED_MARKER = "_SUPERSEDED"
RUNS_DIR = "runs"
FAULT_ENV = "MF_SPARK_FAULT"

# Directories being deleted are first renamed to this prefix so that a crash mid-delete never leaves a
# half-deleted run that still looks published; the next begin_run finishes the job.
_TRASH_PREFIX = ".deleting-"
_RUN_ID_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]*$")
_DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# --------------------------------------------------------------------------------------------------
# small file-system helpers


def fault_point(name: str) -> None:
    """SIGKILL this process when ``MF_SPARK_FAULT == name`` (test-only crash injection)."""
    if os.environ.get(FAULT_ENV) == name:
        log.warning("%s=%s: killing this process (pid %d) with SIGKILL", FAULT_ENV, name, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def json_ready(value: Any) -> Any:
    """Plain JSON values: dates as ISO strings, numpy scalars as Python numbers, NaN/inf as null."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(json_ready(v) for v in value)
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> int:
    """Flush every file and directory under ``path`` to stable storage; returns the number of files.

    Spark's executors close the Parquet files they write but never fsync them. Without this, a power
    loss soon after a publication could leave ``latest.json`` (fsynced) naming tables whose data never
    reached the disk. fsync on any descriptor of a file flushes that file's pages, whichever process
    wrote them.
    """
    files = 0
    for directory, _, names in os.walk(path, topdown=False):
        for name in names:
            # Regular files only, never through a link: a FIFO left in a run directory blocked the open
            # (with the lock held) and a dangling link failed the publication.
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):  # a link, gone, a socket
                    continue
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                os.fsync(fd)
                files += 1
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))
    return files


def temp_sibling(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.tmp-<pid>-<random>``.

    Same directory, so that the final rename stays inside one file system (and so is atomic); a
    leading dot, so that Spark and Hadoop, which skip names starting with ``.`` or ``_``, never read
    a temporary as data.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_json_atomic(path: str | os.PathLike[str], payload: dict[str, Any], *, sort_keys: bool = True) -> None:
    """Write ``payload`` as JSON to ``path`` so that readers see the old file or the new one, never a mix.

    The text goes to a temporary file in the same directory, is fsynced, renamed over ``path`` with
    :func:`os.replace` (atomic on POSIX) and the directory entry is fsynced too. ``sort_keys=False``
    keeps the payload's order (a report written for people).
    """
    path = Path(path)
    text = json.dumps(json_ready(payload), indent=2, sort_keys=sort_keys) + "\n"
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise PublishError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); fix or remove it "
                           "by hand") from None
    if not isinstance(value, dict):
        raise PublishError(f"{path}: expected a JSON object")
    return value


def _remove_tree(path: Path) -> None:
    """Delete a directory crash-safely: rename it to a hidden trash name first, then remove it."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{secrets.token_hex(3)}")
    os.replace(path, trash)
    _delete(trash)


def _delete(path: Path) -> None:
    # rmtree refuses a symbolic link (and never follows one inside the tree): remove the link itself
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``dest`` to write into (not yet created); when the block ends
    without error it replaces ``dest`` whole (:func:`replace_dir`), and it is removed whatever happens.

    Readers of ``dest`` see the old complete directory or the new one: a failure halfway leaves no mix.
    """
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(dest)
    try:
        yield staging
        replace_dir(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(new: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Move the complete directory ``new`` to ``dest`` (same parent), replacing ``dest`` if it exists.

    ``rename(2)`` cannot move a directory over a non-empty one, so the old ``dest`` is first renamed
    to a hidden trash name, then ``new`` renamed into place, then the old one deleted: at every moment
    one complete version exists, and the old one is deleted only once the new one is in place. Between
    the two renames (two system calls) a reader finds no ``dest``; a crash exactly there leaves the old
    version at ``.deleting-<name>-*`` beside it.

    Raises
    ------
    ValueError
        When ``new`` and ``dest`` are not in the same directory (the renames would not be atomic).
    """
    new, dest = Path(new), Path(dest)
    if new.parent.resolve() != dest.parent.resolve():
        raise ValueError(f"replace_dir: {new} and {dest} must be in the same directory")
    fsync_tree(new)  # the old version is deleted below: the new one must be on disk first
    old = None
    if dest.exists():
        old = dest.with_name(f"{_TRASH_PREFIX}{dest.name}-{secrets.token_hex(3)}")
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)  # put the old version back rather than leave no table at all
        raise
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(ts: dt.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------------
# the lock


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), to detect pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3 (state)
    except (OSError, IndexError, ValueError):
        return None


def _process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` on this host is running (zombies and reused pids count as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if _process_state(pid) in ("Z", "X"):
        return False
    if start_ticks is not None:
        current = process_start_ticks(pid)
        if current is not None and current != start_ticks:
            return False
    return True


def describe_holder(info: dict[str, Any]) -> str:
    return (f"{info.get('purpose', 'nightly')} run on host {info.get('host', '?')} pid {info.get('pid', '?')} since {info.get('started_at', '?')}"
            f" (run date {info.get('run_date', '?')}"
            + (f", run_id {info['run_id']}" if info.get("run_id") else "") + ")")


class RunLock:
    """Exclusive lock on an output root: ``<root>/_LOCK``, created with ``O_CREAT | O_EXCL``.

    Use as a context manager around a whole run (or backfill)::

        with RunLock(root, run_date, break_stale=args.break_stale_lock):
            run = begin_run(root, run_date)
            ...
            publish_run(run, manifest)

    Parameters
    ----------
    root : str
        Output root.
    run_date : date
        Recorded in the lock so that the holder can be named.
    purpose : str
        What the holder is doing (``nightly``, ``rollback``), recorded and shown to whoever waits.
    break_stale : bool
        Break a lock whose owner is gone: same host and the pid is not running (or was reused). A live
        owner's lock is never broken, nor is a lock from another host (the error says how to remove it
        by hand).

    Raises
    ------
    LockHeldError
        On entry, when another run holds the lock; the message names host, pid, start time and run date.
    """

    def __init__(self, root: str, run_date: dt.date, break_stale: bool = False, purpose: str = "nightly") -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.run_date = run_date
        self.purpose = purpose
        self.break_stale = break_stale
        self.info: dict[str, Any] = {}
        self._held = False
        self._previous_sigterm: Any = None

    def _payload(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start_ticks": process_start_ticks(os.getpid()),
            "started_at": _iso(_utc_now()),
            "run_date": self.run_date.isoformat(),
            "purpose": self.purpose,
            "token": secrets.token_hex(8),
            "argv": redact_argv(sys.argv),
        }

    def _try_create(self) -> bool:
        # Written whole under a temporary name, then linked to the lock's name, which fails when it exists
        # (atomic, also on NFS): created empty and then written, the lock was read between the two by 13%
        # of the losers of a race in the concurrency review, and called "cut short by a crash".
        self.info = self._payload()
        temporary = temp_sibling(self.path)
        try:
            with open(temporary, "x", encoding="utf-8") as f:
                json.dump(self.info, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                return False
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_dir(self.root)
        return True

    def _holder(self) -> dict[str, Any] | None:
        return read_lock(str(self.root))

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("unreadable"):
            # Cut short or damaged (a crash between create and write, a full disk): nobody can be named or
            # asked. A creator still writing gets a minute; after that only --break-stale-lock breaks it.
            try:
                return self.path.stat().st_mtime < dt.datetime.now().timestamp() - 60
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname():
            return False
        return not pid_alive(int(holder.get("pid", -1)), holder.get("pid_start_ticks"))

    def _break(self, holder: dict[str, Any]) -> bool:
        """Move the stale lock aside; undo if another process replaced it meanwhile."""
        aside = self.root / f"{LOCK_NAME}.stale-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return True
        try:
            moved = _lock_record(aside)
        except FileNotFoundError:
            moved = dict(UNREADABLE_LOCK)
        if moved.get("token") != holder.get("token"):
            # Someone took the lock between our read and our rename: put theirs back untouched.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink()
        log.warning("broke the stale lock of %s", describe_holder(holder))
        return True

    def check_free(self) -> None:
        """Raise what :meth:`acquire` would raise if another run holds the lock now; create nothing.

        Jobs call this before Spark starts, so that a held root costs a second, not a session start-up.
        It is only an early answer: the lock is taken by :meth:`acquire`.
        """
        holder = self._holder() if self.path.exists() else None
        if holder is None or (self.break_stale and self._is_stale(holder)):
            return
        raise LockHeldError(self._held_message(holder))

    def acquire(self) -> RunLock:
        if not self.root.exists():
            # Loud, because a mistyped output.root looks like success: a fresh root, fresh ID maps
            # (every id renumbered), no warm start and no previous run for the quality gate.
            log.warning("output root %s does not exist: creating it. This run starts from nothing: new ID "
                        "maps, no warm start, no previous run for the quality gate. If an existing root was "
                        "meant, stop and check output.root", self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self._held = True
                self._exit_on_sigterm()
                log.info("took the lock %s", self.path)
                return self
            holder = self._holder()
            if holder is None:
                continue  # released between our create and our read
            if self.break_stale and self._is_stale(holder):
                self._break(holder)
                continue
            raise LockHeldError(self._held_message(holder))
        raise LockHeldError(f"{self.path}: could not take the lock after 3 attempts (another run is racing)")

    def _held_message(self, holder: dict[str, Any]) -> str:
        if holder.get("unreadable"):
            return (f"output root {self.root} is locked, but the lock file {self.path} cannot be read (cut short "
                    "by a crash or a full disk), so its holder is unknown. If no run is active on any host using "
                    "this root, rerun with --break-stale-lock (a minute after the file was last written) or "
                    "delete the file by hand.")
        message = f"output root {self.root} is locked by {describe_holder(holder)}; lock file {self.path}."
        if holder.get("host") not in (socket.gethostname(), "?"):
            return (message + " The lock was taken on another host, so it is never broken automatically: "
                    f"check that no run is active on {holder.get('host')}, then delete {self.path} by hand.")
        if self._is_stale(holder):
            return message + " Its process is gone: rerun with --break-stale-lock to break it."
        return message + " That process is still running; wait for it to finish."

    def release(self) -> None:
        if not self._held:
            return
        holder = self._holder()
        if holder is not None and holder.get("token") == self.info.get("token"):
            self.path.unlink()
            log.info("released the lock %s", self.path)
        else:
            log.warning("lock %s is no longer ours (now: %s); leaving it", self.path, holder)
        self._held = False
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _exit_on_sigterm(self) -> None:
        """Turn SIGTERM (a scheduler's timeout, ``yarn application -kill``) into SystemExit(143).

        Python's default SIGTERM action ends the process without unwinding, which would leave the
        lock behind; as an exception it unwinds through ``with RunLock(...)`` and the lock is
        released. SIGKILL cannot be caught: that is what ``--break-stale-lock`` is for.
        """
        if threading.current_thread() is not threading.main_thread():
            return

        def exit_143(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, exit_143)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _holder_may_be_alive(holder: dict[str, Any]) -> bool:
    # On another host the pid cannot be checked: assume the holder is alive, as the lock does.
    if holder.get("host") != socket.gethostname():
        return True
    return pid_alive(int(holder.get("pid", -1)), holder.get("pid_start_ticks"))


#: What a lock whose holder cannot be named reads as (see :meth:`RunLock._is_stale`).
UNREADABLE_LOCK = {"host": "?", "pid": -1, "started_at": "?", "run_date": "?", "unreadable": True}


def read_lock(root: str) -> dict[str, Any] | None:
    """The current lock holder's record, or None when the root is not locked.

    A lock file cut short by a crash between create and write, or damaged (not JSON, a ``pid`` that is
    not an integer, start ticks that are not one), reads as :data:`UNREADABLE_LOCK`: nobody can be named.
    A ``pid_start_ticks`` of another type made a live holder's lock look stale.
    """
    try:
        return _lock_record(Path(root) / LOCK_NAME)
    except FileNotFoundError:
        return None


def _lock_record(path: Path) -> dict[str, Any]:
    # One judgement for reading the lock and for checking the file a break moved aside: the damaged
    # lock's token was read there but not here, so breaking it always looked like losing a race.
    try:
        holder = _read_json(path)
    except PublishError:
        return dict(UNREADABLE_LOCK)
    ticks = holder.get("pid_start_ticks")
    if not _is_int(holder.get("pid")) or not (ticks is None or _is_int(ticks)):
        return dict(UNREADABLE_LOCK)
    return holder


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# run directories


@dataclass(frozen=True)
class RunDir:
    """One run's directory ``<root>/runs/dt=<run_date>/run_id=<run_id>``."""

    root: str
    run_date: dt.date
    run_id: str

    @property
    def relative_path(self) -> str:
        return f"{RUNS_DIR}/dt={self.run_date.isoformat()}/run_id={self.run_id}"

    @property
    def path(self) -> str:
        return str(Path(self.root) / self.relative_path)

    @property
    def record(self) -> dict[str, str]:
        """``run_date``, ``run_id`` and ``path`` (relative to the root): how manifests and latest.json name
        the run."""
        return {"run_date": self.run_date.isoformat(), "run_id": self.run_id, "path": self.relative_path}

    def sub(self, name: str) -> str:
        """Path of a table or file inside the run, e.g. ``run.sub("recommendations")``."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a plain table name: {name!r}")
        return str(Path(self.path) / name)

    @property
    def manifest_path(self) -> str:
        return self.sub(MANIFEST_NAME)


def new_run_id(now: dt.datetime | None = None) -> str:
    """A run id that sorts by start time: UTC timestamp to the microsecond plus a short random suffix."""
    now = now or _utc_now()
    return now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def _iter_run_dirs(root: Path) -> list[RunDir]:
    runs_root = root / RUNS_DIR
    found = []
    if not runs_root.is_dir():
        return found
    for date_dir in runs_root.iterdir():
        # Exactly "dt=YYYY-MM-DD": fromisoformat also takes 20111209 and 2011-W49-5, whose run then had a
        # path no RunDir has and stopped every nightly with a traceback.
        if not date_dir.name.startswith("dt="):
            continue
        try:
            run_date = parse_iso_date(date_dir.name[3:])
        except ValueError:
            continue
        if _linked(date_dir) or not date_dir.is_dir():
            continue
        try:
            run_dirs = list(date_dir.iterdir())
        except FileNotFoundError:  # retention removed the emptied date directory meanwhile
            continue
        for run_dir in run_dirs:
            run_id = run_dir.name[len("run_id="):]
            if (run_dir.name.startswith("run_id=") and _RUN_ID_PATTERN.match(run_id) and not _linked(run_dir)
                    and run_dir.is_dir()):
                found.append(RunDir(str(root), run_date, run_id))
    return sorted(found, key=lambda r: (r.run_date, r.run_id))


def _linked(path: Path) -> bool:
    """True, with a warning, for a symbolic link under ``runs/``: retention and the clean-up of crashed
    runs delete what they list, and through a linked date directory they deleted outside the root;
    a linked run directory could be published, rolled back to and warm-started from."""
    if not path.is_symlink():
        return False
    log.warning("ignoring %s: a symbolic link under runs/ (runs are never followed through links)", path)
    return True


def run_status(run: RunDir) -> str:
    """``published``, ``superseded``, ``failed`` or ``partial`` (see the module docstring); :func:`list_runs`
    shows a partial run that the lock's live holder is writing as ``running``."""
    path = Path(run.path)
    if (path / PUBLISHED_MARKER).exists():
        return "superseded" if (path / SUPERSEDED_MARKER).exists() else "published"
    manifest = path / MANIFEST_NAME
    if manifest.exists():
        try:
            if _read_json(manifest).get("status") == "failed":
                return "failed"
        except (FileNotFoundError, PublishError):  # removed by retention meanwhile, or damaged
            pass
    return "partial"


def check_latest(root: str) -> None:
    """Raise :class:`PublishError` when ``<root>/latest.json`` exists but cannot be read.

    The nightly calls this before Spark starts: publishing reads latest.json, so a corrupt one would
    otherwise fail the run after ingest and training.
    """
    try:
        read_latest(root)
    except PublishError as exc:
        raise PublishError(f"{exc}. Nothing was run. To repair it, point it at a published run: "
                           "jobs/rollback.py --list, then --to RUN_ID (rollback rewrites latest.json)") from None


def _latest_or_none(root: str) -> dict[str, Any] | None:
    """latest.json, or None with a warning when it is corrupt: listing and rolling back must still work,
    since a rollback is how a corrupt latest.json is repaired."""
    try:
        return read_latest(root)
    except PublishError as exc:
        log.warning("%s", exc)
        return None


def list_runs(root: str) -> list[dict[str, Any]]:
    """Every run under ``root``, oldest first: run_date, run_id, path (relative), status, is_latest, and
    error (the first line of a failed run's error, else None)."""
    latest = _latest_or_none(root)
    holder = read_lock(root) or {}
    rows = []
    for run in _iter_run_dirs(Path(root)):
        status = run_status(run)
        if status == "partial" and holder.get("run_id") == run.run_id and _holder_may_be_alive(holder):
            status = "running"  # not a crash: the lock's live holder is writing it
        rows.append({
            "run_date": run.run_date.isoformat(),
            "run_id": run.run_id,
            "path": run.relative_path,
            "status": status,
            "is_latest": bool(latest) and latest.get("run_id") == run.run_id,
            "error": _failure_reason(run) if status == "failed" else None,
        })
    return rows


def _failure_reason(run: RunDir) -> str:
    """The first line of a failed run's recorded error, for a listing (operations.md sends operators here)."""
    try:
        error = str(_read_json(Path(run.manifest_path)).get("error") or "unknown")
    except (FileNotFoundError, PublishError):
        return "unknown (manifest.json unreadable)"
    first = error.strip().splitlines()[0] if error.strip() else "unknown"
    return first if len(first) <= 160 else first[:157] + "..."


def format_runs(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`list_runs` as a text table; ``*`` marks the run latest.json names, a failed
    run shows the first line of its error."""
    if not rows:
        return "no runs"
    lines = [f"  {'run_date':<10}  {'run_id':<30}  status"]
    for row in rows:
        mark = "*" if row["is_latest"] else " "
        why = f": {row['error']}" if row.get("error") else ""
        lines.append(f"{mark} {row['run_date']:<10}  {row['run_id']:<30}  {row['status']}{why}")
    return "\n".join(lines)


def _record_run_id_in_lock(root: Path, run_date: dt.date, run_id: str) -> dict[str, Any] | None:
    """When this process holds the lock, record the run it is writing in it (a backfill's lock, taken
    for its first date, named that date beside a later date's run id); return the lock record (or None)."""
    lock_path = root / LOCK_NAME
    try:
        holder = _read_json(lock_path)
    except (FileNotFoundError, PublishError):
        return None
    if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
        holder["run_id"] = run_id
        holder["run_date"] = run_date.isoformat()
        write_json_atomic(lock_path, holder)
    return holder


def clean_partial_runs(root: str, keep_run_id: str | None = None) -> list[str]:
    """Remove partial run directories (crashed runs) and leftovers of interrupted deletions.

    A directory named by a live lock holder other than this process is kept. Returns the removed
    paths relative to ``root``.
    """
    root_path = Path(root)
    holder = read_lock(root) if (root_path / LOCK_NAME).exists() else None
    other_live_holder = (
        holder is not None
        and not (holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid())
        and (holder.get("host") != socket.gethostname()
             or pid_alive(int(holder.get("pid", -1)), holder.get("pid_start_ticks")))
    )
    if other_live_holder and not holder.get("run_id"):
        log.warning("another run holds %s without naming its run dir yet; not cleaning partial runs",
                    root_path / LOCK_NAME)
        return []
    protected = {keep_run_id, holder.get("run_id") if other_live_holder else None} - {None}
    removed = []
    runs_root = root_path / RUNS_DIR
    if runs_root.is_dir():
        for trash in runs_root.glob(f"dt=*/{_TRASH_PREFIX}*"):
            if not trash.parent.is_symlink():
                _delete(trash)
    for run in _iter_run_dirs(root_path):
        if run.run_id in protected or run_status(run) != "partial":
            continue
        log.warning("removing partial run directory %s left by a crashed run", run.path)
        _remove_tree(Path(run.path))
        removed.append(run.relative_path)
    _remove_empty_date_dirs(root_path)
    return removed


def _remove_empty_date_dirs(root: Path) -> None:
    runs_root = root / RUNS_DIR
    if not runs_root.is_dir():
        return
    for date_dir in runs_root.glob("dt=*"):
        try:
            date_dir.rmdir()  # only succeeds when empty
        except OSError:
            pass


def begin_run(root: str, run_date: dt.date, run_id: str | None = None) -> RunDir:
    """Clean up partial runs, then create and return a fresh run directory for ``run_date``.

    Call it while holding :class:`RunLock`; the run id is then recorded in the lock so that a
    concurrent cleanup never removes this run's directory.
    """
    run_id = run_id or new_run_id()
    if not _RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run_id {run_id!r} must be letters, digits, '.', '_' or '-'")
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    _record_run_id_in_lock(root_path, run_date, run_id)
    clean_partial_runs(root, keep_run_id=run_id)
    run = RunDir(str(root_path), run_date, run_id)
    Path(run.path).mkdir(parents=True, exist_ok=False)
    log.info("run directory %s", run.path)
    return run


# --------------------------------------------------------------------------------------------------
# manifests and publication


def write_manifest(run: RunDir, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` inside the run directory atomically (no publication)."""
    write_json_atomic(run.manifest_path, manifest)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block ends (main thread only): the first one received is raised
    again right after it, to the handler that was in place, so what the block writes is never cut short.

    A Python-level hold: blocking the signal with ``pthread_sigmask`` only covers the main thread, and
    the process-directed signal then goes to one of Py4J's threads.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


#: Free space below this multiple of the previous run's size gets a warning before the run starts.
LOW_SPACE_FACTOR = 1.5


def disk_usage_of(root: str) -> int:
    """Bytes free for this user on the disk of ``root``."""
    return shutil.disk_usage(root).free


def low_space_warning(root: str, previous_run_dir: str) -> str | None:
    """A warning when the disk of ``root`` has less free space than :data:`LOW_SPACE_FACTOR` times the
    size of ``previous_run_dir`` (the run this one warm-starts from; a run is about as big as the last),
    else None. A full disk is only found when it fills (exit 8), after ingest and training."""
    size = sum(f.stat().st_size for f in Path(previous_run_dir).rglob("*") if f.is_file() and not f.is_symlink())
    free = disk_usage_of(root)
    if free >= LOW_SPACE_FACTOR * size:
        return None
    mib = 1024 * 1024
    return (f"output.root {root} has {free / mib:,.1f} MiB free and the previous run "
            f"{Path(previous_run_dir).name} takes {size / mib:,.1f} MiB: this run may run out of space (exit 8)")


def remove_tables(run: RunDir) -> bool:
    """Delete the directories (tables, report, staging) of an unpublished run, keeping its files (the
    manifest): what a full disk's failed run does to make room for its record. True when none is left."""
    if run_status(run) in ("published", "superseded"):
        raise ValueError(f"remove_tables: {run.relative_path} is published")
    for child in Path(run.path).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
    return not any(child.is_dir() for child in Path(run.path).iterdir())


def retract_manifest(run: RunDir) -> None:
    """Rename an unpublished run's ``manifest.json`` (which may say ``published``: latest.json could not
    be written after it) to ``manifest.unpublished.json``, when not even a failed manifest can be
    written: a rename needs no space, and a scheduler reading the status must not see a success."""
    path = Path(run.path) / MANIFEST_NAME
    if path.exists() and run_status(run) not in ("published", "superseded"):
        os.replace(path, path.with_name("manifest.unpublished.json"))


def write_failed_manifest(run: RunDir, manifest: dict[str, Any]) -> None:
    """Record a failed run: its manifest with ``status: failed``; nothing is published.

    ``manifest["error"]`` should say why (the pipeline puts the error message there). Failed runs are
    kept for inspection - the next run's cleanup leaves them, retention removes them once they are
    older than every kept published run.
    """
    payload = {**manifest, "status": "failed", "failed_at": _iso(_utc_now()), "run": run.record}
    payload.setdefault("error", "unknown")
    write_manifest(run, payload)
    log.error("run %s failed, nothing published: %s", run.relative_path, payload["error"])


def read_latest(root: str) -> dict[str, Any] | None:
    """The content of ``<root>/latest.json`` (run_date, run_id, path, published_at), or None.

    Raises
    ------
    PublishError
        When the file is not a JSON object holding ``run_date`` (a date), ``run_id`` and ``path``:
        consumers and publishing both depend on those three.
    """
    path = Path(root) / LATEST_NAME
    try:
        latest = _read_json(path)
    except FileNotFoundError:
        return None
    missing = [key for key in ("run_date", "run_id", "path") if not isinstance(latest.get(key), str)]
    if missing:
        raise PublishError(f"{path}: missing or not a string: {', '.join(missing)}")
    try:
        run_date = parse_iso_date(latest["run_date"])
    except ValueError:
        raise PublishError(f"{path}: run_date {latest['run_date']!r} is not a YYYY-MM-DD date") from None
    if not _RUN_ID_PATTERN.match(latest["run_id"]):
        raise PublishError(f"{path}: run_id {latest['run_id']!r} is not a run id")
    expected = RunDir(root, run_date, latest["run_id"]).relative_path
    if latest["path"] != expected:
        # Publishing and the warm start read the run at "path": an absolute or ../ path made them read
        # a manifest outside the root.
        raise PublishError(f"{path}: path {latest['path']!r} is not the run's directory {expected!r}")
    return latest


def _read_manifest(root: str, relative_path: str) -> dict[str, Any] | None:
    if _linked(Path(root) / relative_path):  # latest.json may name a run that is now a link
        return None
    path = Path(root) / relative_path / MANIFEST_NAME
    try:
        manifest = _read_json(path)
    except FileNotFoundError:
        log.warning("%s is missing; ignoring that run", path)
        return None
    run = manifest.get("run", {})
    manifest["run_dir"] = str(Path(root) / relative_path)
    manifest["run_id"] = run.get("run_id", Path(relative_path).name[len("run_id="):])
    manifest["run_date"] = run.get("run_date", Path(relative_path).parent.name[len("dt="):])
    return manifest


#: Manifest key naming the run a run warm-started from and compared its gate against (None: none).
BASELINE_KEY = "baseline_run"


def previous_published(root: str, before: dt.date | None = None) -> dict[str, Any] | None:
    """The manifest of the run to warm-start from and to compare the quality gate against.

    Without ``before``: the run ``latest.json`` names. With ``before`` (the date being run): the run
    ``latest.json`` names if its date is earlier than ``before``. Otherwise date ``before`` is a rerun
    (or a backfill under a later date), and the answer is the baseline its newest published run
    recorded (``baseline_run`` in the manifest), so a rerun starts from the same model as the first
    run of that date did and gives the same tables. Otherwise (no published run of that date, no
    record, its baseline deleted by retention, or an earlier date published again since that run
    started, as a backfill re-running a range does): the newest published (not superseded) run dated
    before ``before``. Picking that one always was wrong after a rollback: the run rolled back from is
    still published, and a rerun warm-started from it and measured its gate against it.

    The returned dict is the manifest plus ``run_dir`` (the run directory's absolute path),
    ``run_id`` and ``run_date``. None when nothing suitable was published.
    """
    latest = read_latest(root)
    if latest and (before is None or dt.date.fromisoformat(latest["run_date"]) < before):
        return _read_manifest(root, latest["path"])
    if before is None:
        return None
    runs = _iter_run_dirs(Path(root))
    candidates = [r for r in runs if r.run_date < before and run_status(r) == "published"]
    same_date = [r for r in runs if r.run_date == before and run_status(r) in ("published", "superseded")]
    # A candidate published after that run started (run ids sort by start time) is newer work on an
    # earlier date - a backfill re-running the range, or the bad date rerun after a rollback - and
    # is the right baseline; the recorded one then belongs to an older history.
    if same_date and not (candidates and candidates[-1].run_id > same_date[-1].run_id):
        first = _read_manifest(root, same_date[-1].relative_path) or {}
        baseline_id = first.get(BASELINE_KEY, _warm_start_of(first))
        if BASELINE_KEY in first or baseline_id:
            if baseline_id is None:
                return None
            recorded = [r for r in runs
                        if r.run_id == baseline_id and run_status(r) in ("published", "superseded")]
            if recorded:
                return _read_manifest(root, recorded[-1].relative_path)
            instead = (f"using {candidates[-1].relative_path}, the newest published run before {before}"
                       if candidates else f"no published run before {before} is left: a cold start")
            log.warning("the baseline %s of the published run %s is gone (retention); %s, so this rerun's tables "
                        "will differ from that run's (a larger publish.keep_runs keeps older dates "
                        "reproducible)", baseline_id, same_date[-1].relative_path, instead)
    return _read_manifest(root, candidates[-1].relative_path) if candidates else None


def _warm_start_of(manifest: dict[str, Any]) -> str | None:
    """The run a manifest's model was warm-started from: the only record of the baseline in manifests
    written before ``baseline_run`` was (mf-spark before 2026-11-29), so a rerun after upgrading keeps it
    too, or says that retention removed it."""
    train = manifest.get("train")
    warm_start = train.get("warm_start_from") if isinstance(train, dict) else None
    return warm_start if isinstance(warm_start, str) else None


def _latest_names(run: RunDir) -> bool:
    try:
        latest = read_latest(run.root)
    except PublishError:
        return False
    return bool(latest) and latest.get("run_id") == run.run_id


def describe_latest(root: str, run: RunDir) -> str:
    """One line saying what ``<root>/latest.json`` names after ``run`` was published.

    :func:`publish_run` leaves ``latest.json`` on a later date when an older date is (re)run, so "this
    run was published" does not mean consumers read it.
    """
    path = Path(root) / LATEST_NAME
    latest = read_latest(root)
    if latest is None:
        return f"{path} does not exist: no run is published to consumers"
    if latest.get("run_id") == run.run_id:
        return f"{path} names this run"
    why = "a later date stays current; " if str(latest.get("run_date")) > run.run_date.isoformat() else ""
    return (f"{path} left on run {latest.get('run_id')} of date {latest.get('run_date')}, not on this run "
            f"({why}jobs/rollback.py --to {run.run_id} would serve this one)")


def check_writable_root(root: str, source: str = "the config") -> None:
    """Refuse, before any work, an ``output.root`` that is a file or cannot be created or written.

    The nightly and the ingest job create a missing root; this checks that they could (the nearest
    existing ancestor is a writable directory), so the mistake costs seconds and names the key.

    Raises
    ------
    ConfigError
        Naming the key, ``source`` and the reason.
    """
    reason = unwritable_reason(root)
    if reason:
        raise ConfigError(f"output.root = {root} (from {source}) cannot be used: {reason}. Nothing was created")


def unwritable_reason(path: str | os.PathLike[str]) -> str | None:
    """Why the local directory ``path`` could not be created or written to, or None when it could (its
    nearest existing ancestor is a writable directory)."""
    existing = Path(path)
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    except OSError as exc:  # a name longer than the file system allows (ENAMETOOLONG)
        return f"{path} cannot be a directory: {exc.strerror}"
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


def check_output_root(root: str, source: str = "the config") -> Path:
    """The existing output root, for commands that only read or rewrite a publication (rollback).

    Only the nightly and the ingest job create the root; a rollback or listing on a mistyped
    ``output.root`` must neither create it (taking the lock would) nor report "no runs".

    Raises
    ------
    ConfigError
        When ``root`` does not exist or is not a directory; the message names the key and ``source``.
    """
    path = Path(root)
    try:
        exists = path.exists()
    except OSError as exc:  # a name longer than the file system allows (ENAMETOOLONG)
        raise ConfigError(f"output.root = {root} (from {source}) cannot be a directory: {exc.strerror}") from None
    if not exists:
        raise ConfigError(f"output.root = {root} (from {source}) does not exist, so there is no run to list "
                          "or roll back to; check the path. Nothing was created")
    if not path.is_dir():
        raise ConfigError(f"output.root = {root} (from {source}) is not a directory; check the path")
    return path


def _latest_entry(run: RunDir, published_at: str, **extra: Any) -> dict[str, Any]:
    return {**run.record, "manifest": f"{run.relative_path}/{MANIFEST_NAME}", "published_at": published_at,
            **extra}


def publish_run(run: RunDir, manifest: dict[str, Any], keep_runs: int | None = None) -> None:
    """Publish a complete run.

    Order (each step atomic, so a crash between any two leaves the previous publication valid):
    ``manifest.json`` with ``status: published``; the ``_PUBLISHED`` marker; ``latest.json`` replaced
    to name this run - unless it already names a *later* date (a rerun of an old date does not move
    consumers back in time; use :func:`rollback` for that); retention when ``keep_runs`` is given;
    finally older runs of the same date are marked superseded.
    """
    # Read first: a corrupt latest.json must stop the publication before the _PUBLISHED marker exists,
    # or the failed run would still list as published and be a rollback target. The lock keeps it current.
    latest = read_latest(run.root)
    started = time.perf_counter()
    files = fsync_tree(run.path)
    log.info("flushed %d files of %s to disk in %.2fs", files, run.relative_path, time.perf_counter() - started)
    published_at = _iso(_utc_now())
    payload = {**manifest, "status": "published", "published_at": published_at, "run": run.record}
    fault_point("before_manifest")
    write_manifest(run, payload)
    fault_point("before_published_marker")
    marker = Path(run.path) / PUBLISHED_MARKER
    write_json_atomic(marker, {"published_at": published_at})
    fault_point("before_latest")
    try:
        if latest and dt.date.fromisoformat(latest["run_date"]) > run.run_date:
            log.warning("published %s but left latest.json on the later date %s (%s)",
                        run.relative_path, latest["run_date"], latest["run_id"])
        else:
            write_json_atomic(Path(run.root) / LATEST_NAME, _latest_entry(run, published_at))
            log.info("latest.json now names %s", run.relative_path)
    except BaseException:
        # latest.json could not be written (a full disk, Ctrl-C): the job fails and the caller marks the
        # run failed, so it must not stay listed as published, nor be a rollback target. Unless the
        # replace itself went through and the failure came after it (the directory fsync, a SIGTERM):
        # consumers read this run now, so it stays published, or the next run would delete it.
        if not _latest_names(run):
            marker.unlink(missing_ok=True)
        raise
    fault_point("after_latest")
    # The run is published from here on: a failure in the housekeeping below must not turn it into a
    # "failed" run that consumers are reading. The next publication retries it.
    try:
        if keep_runs is not None:
            # The run latest.json named until now too: a consumer that read it a moment ago is reading it.
            apply_retention(run.root, keep_runs, protect=(run.run_id, *([latest["run_id"]] if latest else [])))
        for older in _iter_run_dirs(Path(run.root)):
            if older.run_date == run.run_date and older.run_id < run.run_id and run_status(older) == "published":
                write_json_atomic(Path(older.path) / SUPERSEDED_MARKER,
                                  {"superseded_by": run.run_id, "superseded_at": published_at})
                log.info("run %s superseded by %s", older.relative_path, run.run_id)
    except Exception as exc:  # noqa: BLE001 - any error here leaves a valid publication
        log.error("run %s is published, but the housekeeping after it failed (retention, marking older runs of "
                  "%s superseded): %s: %s. The next publication retries it", run.relative_path, run.run_date,
                  type(exc).__name__, exc)


def apply_retention(root: str, keep_runs: int, protect: Collection[str] = ()) -> list[str]:
    """Keep the published runs (superseded ones included) of the newest ``keep_runs`` run dates, delete
    the runs of older dates.

    Dates, not runs: reruns of one date must not push the previous dates, which are the rollback
    targets and a rerun's warm start and gate baseline, out of the history. The run ``latest.json``
    names and the runs whose ids are in ``protect`` are never deleted, whatever their age. Publishing
    passes its own run (a backfill of an older date is not among the newest runs but is what the next
    backfill day warm-starts from) and the run ``latest.json`` named before it (consumers that read
    ``latest.json`` just before the swap are reading that run; it goes at the next publication).
    Failed runs older than the oldest kept published run go too. Returns the removed paths relative
    to ``root``.
    """
    if keep_runs < 1:
        raise ValueError(f"keep_runs must be at least 1, got {keep_runs}")
    latest = read_latest(root)
    latest_id = latest.get("run_id") if latest else None
    runs = _iter_run_dirs(Path(root))
    published = [r for r in runs if run_status(r) in ("published", "superseded")]
    kept_dates = sorted({r.run_date for r in published})[-keep_runs:]
    kept = [r for r in published if r.run_date in kept_dates]
    if not kept:
        return []
    oldest_kept = (kept[0].run_date, kept[0].run_id)
    removed = []
    for run in runs:
        status = run_status(run)
        doomed = (
            (status in ("published", "superseded") and run not in kept)
            or (status == "failed" and (run.run_date, run.run_id) < oldest_kept)
        )
        if doomed and run.run_id != latest_id and run.run_id not in protect:
            _remove_tree(Path(run.path))
            removed.append(run.relative_path)
            log.info("retention: removed %s (%s; publish.keep_runs = %d keeps the newest run dates)",
                     run.relative_path, status, keep_runs)
    _remove_empty_date_dirs(Path(root))
    return removed


def rollback(root: str, target: str) -> dict[str, Any]:
    """Point ``latest.json`` at an older published run and return the new ``latest.json`` content.

    ``target`` is a run id, or a date ``YYYY-MM-DD`` meaning that date's newest published run.
    Nothing is deleted; the next nightly publishes as usual.

    Raises
    ------
    PublishError
        When no published run matches ``target``.
    """
    runs = [r for r in _iter_run_dirs(Path(root)) if run_status(r) in ("published", "superseded")]
    if _DATE_PATTERN.match(target):
        matches = [r for r in runs if r.run_date.isoformat() == target]
    else:
        matches = [r for r in runs if r.run_id == target]
    if not matches:
        known = ", ".join(f"{r.run_date} {r.run_id}" for r in runs) or "none"
        raise PublishError(f"{root}: no published run matches {target!r} (published runs: {known})")
    run = matches[-1]
    previous = _latest_or_none(root)
    entry = _latest_entry(run, _iso(_utc_now()), rolled_back_from=(previous or {}).get("run_id"))
    write_json_atomic(Path(root) / LATEST_NAME, entry)
    was = (previous or {}).get("run_date", ""), (previous or {}).get("run_id", "")
    # The same command also moves forward again (to a newer run after a rollback): say which it did.
    now = run.run_date.isoformat(), run.run_id
    moved = "rolled back" if now < was else "moved forward" if now > was else "unchanged"
    log.warning("%s: latest.json now names %s (was %s)", moved, run.relative_path, (previous or {}).get("path"))
    return entry


# --------------------------------------------------------------------------------------------------
# provenance


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """The commit the code came from.

    ``spark-submit.sh`` stamps it into the shipped zip as ``mf_spark/_build_info.json`` (the driver
    may run far from the checkout, e.g. YARN cluster mode); otherwise ``git rev-parse HEAD`` of the
    checkout that tracks the package's files, with ``-dirty`` when the package has uncommitted changes;
    otherwise (an installed package) ``"unknown"``.
    """
    import pkgutil

    try:
        data = pkgutil.get_data("mf_spark", "_build_info.json")
    except OSError:
        data = None
    if data:
        try:
            return str(json.loads(data)["git_commit"])
        except (ValueError, KeyError):
            pass
    package_dir = Path(__file__).resolve().parent
    if package_dir.is_dir():
        def git(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["git", *args], cwd=package_dir, capture_output=True, text=True, timeout=10)

        try:
            # Installed (not editable) into a venv inside some other repository, git would answer with
            # that repository's commit: only a checkout that tracks this package's files counts (at its
            # top or deeper, as in a monorepo, where spark-submit.sh stamps the same commit).
            if git("ls-files", "--error-unmatch", "--", "__init__.py").returncode == 0:
                head = git("rev-parse", "HEAD")
                if head.returncode == 0:
                    # as spark-submit.sh stamps its zip: uncommitted changes to the package are not the commit
                    dirty = git("status", "--porcelain", "--", ".").stdout.strip()
                    return f"{head.stdout.strip()}-dirty" if dirty else head.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def _spark_version() -> str:
    """The running JVM's Spark version when a context exists (it can differ from the pyspark package's)."""
    context_module = sys.modules.get("pyspark.core.context") or sys.modules.get("pyspark.context")
    context = getattr(getattr(context_module, "SparkContext", None), "_active_spark_context", None)
    if context is not None:
        return str(context.version)
    return _package_version("pyspark")


#: Setting names whose values are credentials (``spark.hadoop.fs.s3a.secret.key``, a token, a password):
#: manifests and the lock file are readable by everyone who reads the runs, and retention keeps them.
_SECRET_NAME = re.compile(r"(password|passwd|secret|token|credential|access[._-]?key|private[._-]?key)", re.I)
REDACTED = "<redacted>"


def redact_settings(value: Any) -> Any:
    """``value`` (a config table, nested) with the values of credential-like keys replaced by ``<redacted>``."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_NAME.search(k) else redact_settings(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact_settings(v) for v in value]
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with credential-like values replaced by ``<redacted>``.

    Covers ``key=value`` arguments whose key names a credential (``--set``, ``--conf``, ``--set=k=v``) and
    options so named (``--password=value``, ``--access-key value``): no job has such an option today, but a
    wrapper may pass one, and the command line goes into manifests and the lock.
    """
    def redacted(arg: str) -> str:
        option, has_value, setting = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if option and has_value and _SECRET_NAME.search(option):
            return f"{option}={REDACTED}"
        key, equals, _ = setting.partition("=")  # --set=key=value as well as key=value
        if equals and _SECRET_NAME.search(key):
            return f"{option}{'=' if option else ''}{key}={REDACTED}"
        return arg

    out = [redacted(arg) for arg in argv]
    for i in range(1, len(out)):
        previous = argv[i - 1]
        if previous.startswith("--") and "=" not in previous and _SECRET_NAME.search(previous):
            # --password value, also a value starting with "-"; a flag so named without a value hides the
            # next argument: the safe side of guessing
            out[i] = REDACTED
    return out


def provenance(**extra: Any) -> dict[str, Any]:
    """Where a result comes from: versions, git commit, host, pid, command line (``argv``), start time.

    The nightly's manifest, a standalone evaluation's ``source`` and a saved model's ``provenance`` all
    record it in this one shape. ``extra`` (e.g. ``interactions``) is merged in at the top level.
    """
    import mf_spark

    return {
        "versions": {
            "spark": _spark_version(),
            "pyspark": _package_version("pyspark"),
            "python": platform.python_version(),
            "mf_spark": getattr(mf_spark, "__version__", "unknown"),
            **{name: _package_version(name) for name in ("numpy", "pandas", "pyarrow")},
        },
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "argv": redact_argv(sys.argv),
        "started_at": _iso(_utc_now()),
        **extra,
    }


def manifest_base(run: RunDir | None = None, **extra: Any) -> dict[str, Any]:
    """Provenance every manifest starts from: the run, then :func:`provenance`.

    Parameters
    ----------
    run : RunDir, optional
        Recorded as ``run`` (run_date, run_id, path relative to the root).
    **extra
        Merged in at the top level (``config_file``, ``parameters``...).
    """
    base: dict[str, Any] = {}
    if run is not None:
        base["run"] = run.record
    return {**base, **provenance(**extra)}
