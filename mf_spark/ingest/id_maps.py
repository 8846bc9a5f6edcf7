"""Stable string id -> dense int index maps (``dim_user``, ``dim_item``), versioned on disk.

Layout under ``root`` (the pipeline passes ``<output.root>/id_maps``)::

    CURRENT.json                        pointer: which version of each map is current, and its size
    dim_user/version=<run_id>/*.parquet user_id string, user_idx int
    dim_item/version=<run_id>/*.parquet item_id string, item_idx int

A run writes a new map version into its own directory, then replaces ``CURRENT.json`` atomically
(temporary file + ``os.replace``). Readers only follow the pointer, so a crash at any point leaves the
previous maps current. Indices are append-only: an id keeps its index forever, new ids get the next
indices in the sorted order of the id string. The pointer needs a POSIX rename, so ``root`` must be a
local (or NFS) path.

Writers should hold the output root's lock (:class:`mf_spark.publish.RunLock`); the nightly and the
ingest job do. The swap is also a compare-and-swap: it is refused with :class:`IdMapConflictError`
when ``CURRENT.json`` changed since the run read it, because the run numbered its new ids from the
sizes it read, and swapping anyway would give those indices to different ids.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mf_spark.errors import InputDataError, LockHeldError, damaged_file_cause

log = logging.getLogger(__name__)

POINTER_FILE = "CURRENT.json"
#: flock()ed around the compare-and-swap of the pointer; never deleted, so its lock cannot go stale.
SWAP_LOCK_FILE = ".pointer-swap.flock"
POINTER_FORMAT = 1
#: Largest index an int column can hold (the ALS and MLlib use Int ids).
MAX_INDEX = 2**31 - 1
#: Map versions kept per dimension (the current one always among them); older ones are deleted.
KEEP_VERSIONS = 5

#: dimension name -> (id column, index column)
DIMENSIONS = {"dim_user": ("user_id", "user_idx"), "dim_item": ("item_id", "item_idx")}

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]*$")


class IdMapConflictError(LockHeldError):
    """Another writer replaced ``CURRENT.json`` while this run was extending the maps.

    A :class:`LockHeldError` (exit code 6): like a held lock, it means two writers ran at once.
    """


@dataclass(frozen=True)
class IdMapUpdate:
    """The maps after a run, and how many ids this run added."""

    dim_user: DataFrame
    dim_item: DataFrame
    new_users: int
    new_items: int
    pointer: dict[str, Any]


def local_root(root: str) -> Path:
    """``root`` as a local path; raises InputDataError for a non-local URL."""
    if root.startswith("file://"):
        root = root[len("file://") :]
    elif "://" in root:
        raise InputDataError(
            f"id map root {root} is not a local path: the atomic pointer swap needs a local or NFS "
            "filesystem (set output.root to a local path)"
        )
    return Path(root)


def read_pointer(root: str) -> dict[str, Any] | None:
    """The current pointer, or None when no map has been written yet."""
    path = local_root(root) / POINTER_FILE
    try:
        with path.open(encoding="utf-8") as f:
            pointer = json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as exc:  # os.replace never leaves a half-written pointer; a person did
        raise InputDataError(f"id map pointer {path} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
        found = pointer.get("format") if isinstance(pointer, dict) else type(pointer).__name__
        raise InputDataError(f"id map pointer {path} has unknown format {found!r}")
    for name, entry in (pointer.get("maps") or {}).items():
        # Only "<map>/version=<run id>": pruning compared paths as written, so "dim_user/../dim_user/
        # version=A" loaded fine and then had its current version deleted; "../" read maps elsewhere.
        version = entry.get("path", "") if isinstance(entry, dict) else ""
        prefix = f"{name}/version="
        if (name not in DIMENSIONS or not version.startswith(prefix) or not _RUN_ID.match(version[len(prefix):])
                or not isinstance(entry.get("size"), int)):
            raise InputDataError(f"id map pointer {path}: entry {name!r} = {entry!r} is not "
                                 f"{{\"path\": \"<map>/version=<run id>\", \"size\": <int>}}; {_RESTORE_HINT}")
    return pointer


#: Why not just start afresh: new maps would give every id a new index, breaking warm starts and the
#: indices of every published table.
_RESTORE_HINT = "restore it from a backup; do not delete the maps: new ones would give every id a new index"


def _schema(name: str) -> T.StructType:
    id_col, idx_col = DIMENSIONS[name]
    return T.StructType(
        [T.StructField(id_col, T.StringType(), False), T.StructField(idx_col, T.IntegerType(), False)]
    )


def load_id_map(spark: SparkSession, root: str, name: str) -> DataFrame:
    """The current map ``name`` (``dim_user`` or ``dim_item``) under ``root``, the ``<output.root>/id_maps``
    directory; an empty frame when none exists yet."""
    pointer = read_pointer(root)
    if pointer is None and (local_root(root) / "id_maps" / POINTER_FILE).exists():
        # output.root itself holds no pointer, so this would silently be an empty map
        raise InputDataError(f"{root} is an output root: the id maps are under {os.path.join(root, 'id_maps')}")
    return _load_version(spark, root, pointer, name)


def _load_version(spark: SparkSession, root: str, pointer: dict[str, Any] | None, name: str) -> DataFrame:
    """The map ``name`` as ``pointer`` names it (which need not be the current pointer any more)."""
    if pointer is None or name not in pointer["maps"]:
        return spark.createDataFrame([], _schema(name))
    path = local_root(root) / pointer["maps"][name]["path"]
    if not path.is_dir():
        # Spark's PATH_NOT_FOUND came after the whole ingest, on every later run alike
        raise InputDataError(f"id map {name}: {local_root(root) / POINTER_FILE} names {path}, which does not exist; "
                             f"{_RESTORE_HINT}")
    return spark.read.schema(_schema(name)).parquet(str(path))


def _checked_size(existing: DataFrame, name: str, size: int, where: Path) -> None:
    """Fail when the stored map is not the dense ``0..size-1`` the pointer promises."""
    _, idx_col = DIMENSIONS[name]
    try:
        row = existing.agg(
            F.count(F.lit(1)).alias("n"), F.min(idx_col).alias("lo"), F.max(idx_col).alias("hi")
        ).first()
    except Exception as exc:
        cause = damaged_file_cause(exc)
        if cause is None:
            raise
        raise InputDataError(f"id map {where} is damaged: {cause}; {_RESTORE_HINT}") from None
    ok = row["n"] == size and (size == 0 or (row["lo"] == 0 and row["hi"] == size - 1))
    if not ok:
        raise InputDataError(
            f"id map {where} is damaged: the pointer says {size} dense indices, the files hold {row['n']} "
            f"rows with indices {row['lo']}..{row['hi']}"
        )


def _shuffle_partitions(spark: SparkSession) -> int:
    # An explicit count: AQE would otherwise coalesce a small range repartition into one partition.
    try:
        return max(1, int(spark.conf.get("spark.sql.shuffle.partitions") or 200))
    except ValueError:  # e.g. "auto" on some platforms
        return 200


def append_new_ids(
    existing: DataFrame, existing_size: int, ids: DataFrame, name: str
) -> tuple[DataFrame, int]:
    """Extend a map with the ids it lacks.

    Parameters
    ----------
    existing : DataFrame
        The current map (``<id> string, <idx> int``), dense ``0..existing_size-1``.
    existing_size : int
        Its number of rows.
    ids : DataFrame
        One column named like the map's id column; duplicates allowed.
    name : str
        ``dim_user`` or ``dim_item``.

    Returns
    -------
    (DataFrame, int)
        The extended map (old rows unchanged, new ids numbered from ``existing_size`` in sorted id order)
        and the number of new ids.

    Raises
    ------
    InputDataError
        When the new indices would pass :data:`MAX_INDEX`.
    """
    id_col, idx_col = DIMENSIONS[name]
    new_ids = ids.select(id_col).distinct().join(existing.select(id_col), id_col, "left_anti")
    # Number the sorted new ids without funnelling them through one partition: range-partition by id,
    # count each partition, and offset each partition's row numbers by the counts before it. The
    # partition of a row comes from sampled range bounds, which a recomputation could draw differently,
    # so the tagged rows are checkpointed before anything is counted.
    tagged = (
        new_ids.repartitionByRange(_shuffle_partitions(ids.sparkSession), id_col)
        .select(id_col, F.spark_partition_id().alias("_part"))
        .checkpoint(eager=True)
    )
    counts = sorted(
        (row["_part"], row["n"])
        for row in tagged.groupBy("_part").agg(F.count(F.lit(1)).alias("n")).collect()
    )
    n_new = sum(n for _, n in counts)
    if existing_size + n_new - 1 > MAX_INDEX:
        raise InputDataError(
            f"{name}: {existing_size} ids + {n_new} new ids exceed the int index range ({MAX_INDEX + 1} ids)"
        )
    offsets: list[Column] = []
    start = existing_size
    for part, n in counts:
        offsets += [F.lit(part), F.lit(start)]
        start += n
    offset = F.create_map(*offsets)[F.col("_part")] if offsets else F.lit(existing_size)
    rank = F.row_number().over(Window.partitionBy("_part").orderBy(id_col))
    numbered = tagged.select(id_col, (offset + rank - 1).cast("int").alias(idx_col))
    return existing.unionByName(numbered), n_new


def swap_pointer(root: Path, pointer: dict[str, Any]) -> None:
    """Atomically make ``pointer`` current (temporary file, fsync, ``os.replace``, fsync the directory)."""
    from mf_spark.publish import write_json_atomic

    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / POINTER_FILE, pointer)


@contextmanager
def _swap_guard(root: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the swap lock file, so that compare and swap are one step.

    flock, unlike an O_EXCL file, is released by the kernel when the process dies, so a SIGKILL
    between compare and swap cannot leave the maps locked. Separate ``open`` calls conflict even in
    one process, so threads are serialised too.
    """
    root.mkdir(parents=True, exist_ok=True)
    with open(root / SWAP_LOCK_FILE, "a", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def compare_and_swap_pointer(root: Path, expected: dict[str, Any] | None, pointer: dict[str, Any]) -> None:
    """Make ``pointer`` current only if ``CURRENT.json`` still holds ``expected`` (None: no pointer yet).

    Raises
    ------
    IdMapConflictError
        When another writer swapped the pointer since ``expected`` was read; nothing is changed.
    """
    with _swap_guard(root):
        found = read_pointer(str(root))
        if found != expected:
            raise IdMapConflictError(
                f"id map pointer {root / POINTER_FILE} changed while run {pointer.get('run_id')} was "
                f"extending the maps (read {_describe(expected)}, now {_describe(found)}): another "
                "writer updated the ID maps at the same time. This run's maps were not made current; "
                "rerun it (hold the output root's lock, as the nightly and jobs/ingest.py do)."
            )
        swap_pointer(root, pointer)


def _describe(pointer: dict[str, Any] | None) -> str:
    if pointer is None:
        return "no pointer"
    sizes = ", ".join(f"{name} {entry['size']}" for name, entry in sorted(pointer["maps"].items()))
    return f"version of run {pointer.get('run_id')} ({sizes or 'empty'})"


def _version_dir(root: Path, name: str, run_id: str, current: str | None) -> Path:
    """A directory for this run's version that is not the current one (a rerun with the same run id)."""
    base = f"{name}/version={run_id}"
    candidate, n = base, 0
    while candidate == current:
        n += 1
        candidate = f"{base}.{n}"
    path = root / candidate
    if path.exists():  # left over by a run that crashed before its pointer swap: never current
        shutil.rmtree(path)
    return path


def _prune_versions(root: Path, name: str, current: str, keep: int) -> None:
    versions = sorted(
        (p for p in (root / name).glob("version=*") if p.is_dir()), key=lambda p: p.stat().st_mtime
    )
    current_path = (root / current).resolve()
    stale = [p for p in versions if p.resolve() != current_path][: max(0, len(versions) - keep)]
    for path in stale:
        log.info("deleting old id map version %s", path)
        shutil.rmtree(path, ignore_errors=True)


def update_id_maps(
    spark: SparkSession,
    root: str,
    run_id: str,
    users: DataFrame,
    items: DataFrame,
    keep_versions: int = KEEP_VERSIONS,
) -> IdMapUpdate:
    """Append this run's new user and item ids to the persisted maps and return the maps after the run.

    Parameters
    ----------
    root : str
        Local directory of the maps (``<output.root>/id_maps``); created when absent.
    run_id : str
        Names the new version directories (letters, digits, ``_.:+-``).
    users, items : DataFrame
        Column ``user_id`` / ``item_id`` (string) of the ids that must have an index.

    Nothing is written when no id is new. Otherwise each changed map is written to
    ``<name>/version=<run_id>/`` and then the pointer is swapped; a failure before the swap leaves the
    previous maps current and removes the version directories this call wrote (only a killed process
    leaves them behind).

    Raises
    ------
    IdMapConflictError
        When ``CURRENT.json`` changed since this call read it (a concurrent writer): the pointer is
        left as the other writer made it and this run's version directories are removed.
    InputDataError
        When a map version ``CURRENT.json`` names is missing or its files are damaged.
    """
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run_id {run_id!r} must be letters, digits and _.:+- only")
    root_path = local_root(root)
    # Read once: the sizes new ids are numbered from, the maps extended and the compare-and-swap
    # must all refer to this same version.
    read = read_pointer(root)
    pointer = read or {"format": POINTER_FORMAT, "maps": {}}
    extended = _extended_maps(spark, root, pointer, {"dim_user": users, "dim_item": items})
    if any(n_new for _, _, n_new in extended.values()):
        pointer = _write_and_swap(root_path, read, pointer, extended, run_id)
        for name in extended:
            _prune_versions(root_path, name, pointer["maps"][name]["path"], keep_versions)
    # The maps this run's pointer names, not whatever is current by now: the caller joins its
    # interactions with them, so they must be the ones the indices were assigned in.
    return IdMapUpdate(
        dim_user=_load_version(spark, root, pointer, "dim_user"),
        dim_item=_load_version(spark, root, pointer, "dim_item"),
        new_users=extended["dim_user"][2],
        new_items=extended["dim_item"][2],
        pointer=pointer,
    )


def _extended_maps(
    spark: SparkSession, root: str, pointer: dict[str, Any], ids_by_map: dict[str, DataFrame]
) -> dict[str, tuple[DataFrame, int, int]]:
    """Per map name: (the map with the new ids appended, its size before, the count of new ids)."""
    root_path = local_root(root)
    extended: dict[str, tuple[DataFrame, int, int]] = {}
    for name, ids in ids_by_map.items():
        entry = pointer["maps"].get(name)
        size = int(entry["size"]) if entry else 0
        existing = _load_version(spark, root, pointer, name)
        if entry:
            _checked_size(existing, name, size, root_path / entry["path"])
        new_map, n_new = append_new_ids(existing, size, ids, name)
        extended[name] = (new_map, size, n_new)
    return extended


def _write_and_swap(
    root_path: Path,
    read: dict[str, Any] | None,
    pointer: dict[str, Any],
    extended: dict[str, tuple[DataFrame, int, int]],
    run_id: str,
) -> dict[str, Any]:
    """Write the changed maps as new versions and swap the pointer from ``read`` to them; returns the new
    pointer. On any failure the versions written here that did not become current are removed."""
    from mf_spark import publish

    new_pointer: dict[str, Any] = {
        "format": POINTER_FORMAT,
        "run_id": run_id,
        "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "maps": dict(pointer["maps"]),
    }
    written: list[Path] = []
    try:
        for name, (new_map, size, n_new) in extended.items():
            if n_new == 0:
                continue
            current = pointer["maps"].get(name, {}).get("path")
            target = _version_dir(root_path, name, run_id, current)
            written.append(target)
            new_map.write.mode("errorifexists").parquet(str(target))
            # Spark never fsyncs what it writes; the pointer is fsynced, so without this a power loss
            # could leave CURRENT.json naming map files that never reached the disk, failing every
            # later run.
            publish.fsync_tree(target)
            new_pointer["maps"][name] = {"path": str(target.relative_to(root_path)), "size": size + n_new}
            log.info("%s: %d ids, %d new, written to %s", name, size + n_new, n_new, target)
        compare_and_swap_pointer(root_path, read, new_pointer)
    except BaseException:
        # A concurrent writer, a full disk, Ctrl-C: the versions this run wrote are never current,
        # and left behind they counted among the newest kept by _prune_versions, pushing out real
        # ones. Unless the swap itself went through (a failure after it): then they are the maps.
        with suppress(Exception):
            named = {entry["path"] for entry in (read_pointer(str(root_path)) or {"maps": {}})["maps"].values()}
            for target in written:
                if str(target.relative_to(root_path)) not in named:
                    shutil.rmtree(target, ignore_errors=True)
        raise
    return new_pointer
