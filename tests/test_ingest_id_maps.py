"""ID maps: append-only dense indices across runs, atomic pointer swap, Int range, reruns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from chispa import assert_df_equality

from mf_spark.errors import InputDataError
from mf_spark.ingest import id_maps
from mf_spark.ingest.id_maps import MAX_INDEX, append_new_ids, load_id_map, read_pointer, update_id_maps

USER_MAP = "user_id string, user_idx int"
ITEM_MAP = "item_id string, item_idx int"


def assert_user_map(spark, actual, rows) -> None:
    assert_df_equality(actual, spark.createDataFrame(rows, USER_MAP), ignore_row_order=True, ignore_nullable=True)


def ids(spark, column, values):
    return spark.createDataFrame([(v,) for v in values], f"{column} string")


def update(spark, root, run_id, users, items):
    return update_id_maps(
        spark, str(root), run_id, ids(spark, "user_id", users), ids(spark, "item_id", items)
    )


def test_append_across_two_runs_keeps_old_indices_and_stays_dense(spark, tmp_path):
    first = update(spark, tmp_path, "run1", ["b", "a", "b"], ["x"])
    assert (first.new_users, first.new_items) == (2, 1)
    assert_df_equality(
        first.dim_user,
        spark.createDataFrame([("a", 0), ("b", 1)], USER_MAP),
        ignore_row_order=True,
        ignore_nullable=True,
    )

    # run 2: 'a' is gone from the input but keeps its index; new ids follow in sorted order
    second = update(spark, tmp_path, "run2", ["c", "b", "aa"], ["x"])
    assert (second.new_users, second.new_items) == (2, 0)
    expected = spark.createDataFrame([("a", 0), ("b", 1), ("aa", 2), ("c", 3)], USER_MAP)
    assert_df_equality(second.dim_user, expected, ignore_row_order=True, ignore_nullable=True)
    assert_df_equality(
        second.dim_item,
        spark.createDataFrame([("x", 0)], ITEM_MAP),
        ignore_row_order=True,
        ignore_nullable=True,
    )

    pointer = read_pointer(str(tmp_path))
    assert pointer["run_id"] == "run2"
    assert pointer["maps"]["dim_user"] == {"path": "dim_user/version=run2", "size": 4}
    assert pointer["maps"]["dim_item"] == {
        "path": "dim_item/version=run1",
        "size": 1,
    }  # unchanged: not rewritten
    assert not (tmp_path / "dim_item" / "version=run2").exists()


def test_crash_before_the_pointer_swap_leaves_the_old_map_current(spark, tmp_path, monkeypatch):
    update(spark, tmp_path, "run1", ["a"], ["x"])
    before = json.loads((tmp_path / "CURRENT.json").read_text())

    def crash(root, pointer):
        raise OSError("simulated crash between writing the new version and swapping the pointer")

    monkeypatch.setattr(id_maps, "swap_pointer", crash)
    with pytest.raises(OSError, match="simulated crash"):
        update(spark, tmp_path, "run2", ["a", "b"], ["x", "y"])
    # the new version was written but is not current; an error (not a kill) also removes it
    assert not (tmp_path / "dim_user" / "version=run2").exists()
    assert json.loads((tmp_path / "CURRENT.json").read_text()) == before
    assert_df_equality(
        load_id_map(spark, str(tmp_path), "dim_user"),
        spark.createDataFrame([("a", 0)], USER_MAP),
        ignore_nullable=True,
    )
    monkeypatch.undo()

    # a killed run leaves its version behind: the rerun replaces the abandoned directory and completes
    spark.createDataFrame([("zzz", 0)], USER_MAP).write.parquet(str(tmp_path / "dim_user" / "version=run2"))
    rerun = update(spark, tmp_path, "run2", ["a", "b"], ["x", "y"])
    assert (rerun.new_users, rerun.new_items) == (1, 1)
    assert_user_map(spark, rerun.dim_user, [("a", 0), ("b", 1)])
    assert not list(tmp_path.glob(".CURRENT.json.*"))  # no temporary pointer left behind


def test_pointer_swap_is_a_rename_of_a_complete_file(tmp_path, monkeypatch):
    renames = []
    real_replace = id_maps.os.replace

    def spy(src, dst):
        renames.append((json.loads(open(src).read()), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(id_maps.os, "replace", spy)
    pointer = {"format": 1, "maps": {}}
    id_maps.swap_pointer(tmp_path, pointer)
    assert renames == [(pointer, str(tmp_path / "CURRENT.json"))]


def test_rerun_with_the_same_run_id_does_not_overwrite_the_current_version(spark, tmp_path):
    update(spark, tmp_path, "run1", ["a"], ["x"])
    again = update(spark, tmp_path, "run1", ["a", "b"], ["x"])
    assert read_pointer(str(tmp_path))["maps"]["dim_user"]["path"] == "dim_user/version=run1.1"
    assert_user_map(spark, again.dim_user, [("a", 0), ("b", 1)])


def test_map_files_reach_the_disk_before_the_pointer_names_them(spark, tmp_path, monkeypatch):
    """The pointer was fsynced, the Parquet files of the version it names were not (Spark never fsyncs)."""
    from mf_spark import publish

    events = []
    real_fsync_tree, real_swap = publish.fsync_tree, id_maps.compare_and_swap_pointer
    monkeypatch.setattr(publish, "fsync_tree", lambda path: events.append(("fsync", Path(path).parent.name))
                        or real_fsync_tree(path))
    monkeypatch.setattr(id_maps, "compare_and_swap_pointer", lambda *a: events.append(("swap",)) or real_swap(*a))
    update_id_maps(spark, str(tmp_path), "run0", ids(spark, "user_id", ["u"]), ids(spark, "item_id", ["i"]))
    assert events == [("fsync", "dim_user"), ("fsync", "dim_item"), ("swap",)]


def test_old_versions_are_pruned(spark, tmp_path):
    for n in range(4):
        update_id_maps(
            spark,
            str(tmp_path),
            f"run{n}",
            ids(spark, "user_id", [f"u{n}"]),
            ids(spark, "item_id", [f"i{n}"]),
            keep_versions=2,
        )
    versions = sorted(p.name for p in (tmp_path / "dim_user").iterdir())
    assert versions == ["version=run2", "version=run3"]
    assert load_id_map(spark, str(tmp_path), "dim_user").count() == 4


def test_load_id_map_given_the_output_root_says_where_the_maps_are(spark, tmp_path):
    """docs/ingest.md said load_id_map(spark, root, ...) next to output.root: given output.root it
    returned an empty map without a word."""
    maps = tmp_path / "id_maps"
    update_id_maps(spark, str(maps), "run0", ids(spark, "user_id", ["u"]), ids(spark, "item_id", ["i"]))
    assert load_id_map(spark, str(maps), "dim_user").count() == 1
    with pytest.raises(InputDataError, match=f"{tmp_path} is an output root: the id maps are under {maps}"):
        load_id_map(spark, str(tmp_path), "dim_user")
    assert load_id_map(spark, str(tmp_path / "nothing-yet"), "dim_user").count() == 0  # a first run


def test_int_range_is_checked_before_writing(spark):
    existing = spark.createDataFrame([], USER_MAP)
    # an existing map of MAX_INDEX ids has room for exactly one more (index MAX_INDEX)
    _, n_new = append_new_ids(existing, MAX_INDEX, ids(spark, "user_id", ["a"]), "dim_user")
    assert n_new == 1
    with pytest.raises(InputDataError, match="exceed the int index range"):
        append_new_ids(existing, MAX_INDEX, ids(spark, "user_id", ["a", "b"]), "dim_user")


def test_damaged_map_and_non_local_root_are_input_errors(spark, tmp_path):
    update(spark, tmp_path, "run1", ["a", "b"], ["x"])
    pointer = json.loads((tmp_path / "CURRENT.json").read_text())
    pointer["maps"]["dim_user"]["size"] = 3
    (tmp_path / "CURRENT.json").write_text(json.dumps(pointer))
    with pytest.raises(InputDataError, match="damaged"):
        update(spark, tmp_path, "run2", ["c"], ["x"])
    with pytest.raises(InputDataError, match="not a local path"):
        read_pointer("s3a://bucket/id_maps")
    with pytest.raises(ValueError, match="run_id"):
        update(spark, tmp_path, "../escape", ["c"], ["x"])


def test_a_missing_or_damaged_map_version_is_an_input_error_naming_it(spark, tmp_path):
    """Both gave Spark's PATH_NOT_FOUND or a footer trace (exit 1) after the whole ingest, every night."""
    update(spark, tmp_path, "run1", ["a", "b"], ["x"])
    version = tmp_path / "dim_user" / "version=run1"
    part = next(version.glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:-20])  # footer cut off
    with pytest.raises(InputDataError, match=r"id map .*dim_user/version=run1 is damaged: .*part-.*\.parquet.*restore it"):
        update(spark, tmp_path, "run2", ["c"], ["x"])
    shutil.rmtree(version)
    with pytest.raises(InputDataError, match=r"id map dim_user: .*CURRENT\.json names .*version=run1, which does "
                       r"not exist; restore it"):
        update(spark, tmp_path, "run2", ["c"], ["x"])
    with pytest.raises(InputDataError, match="which does not exist"):
        load_id_map(spark, str(tmp_path), "dim_user")


def test_a_failed_update_removes_the_versions_it_wrote(spark, tmp_path, monkeypatch):
    """A full disk while writing dim_item left dim_user/version=<run> behind; _prune_versions counted it
    among the newest and so removed a real older version."""
    import errno

    from mf_spark import publish

    update(spark, tmp_path, "run1", ["a"], ["x"])
    real_fsync = publish.fsync_tree
    calls = []

    def full_on_the_second_map(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(path)

    monkeypatch.setattr(publish, "fsync_tree", full_on_the_second_map)
    with pytest.raises(OSError):
        update(spark, tmp_path, "run2", ["b"], ["y"])
    assert sorted(p.name for p in (tmp_path / "dim_user").iterdir()) == ["version=run1"]
    assert sorted(p.name for p in (tmp_path / "dim_item").iterdir()) == ["version=run1"]
    assert read_pointer(str(tmp_path))["run_id"] == "run1"

    # a failure after the pointer swap went through: the versions are the current maps and must stay
    monkeypatch.undo()
    real_swap = id_maps.compare_and_swap_pointer

    def swapped_then_failed(*args, **kwargs):
        real_swap(*args, **kwargs)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(id_maps, "compare_and_swap_pointer", swapped_then_failed)
    with pytest.raises(OSError):
        update(spark, tmp_path, "run3", ["c"], ["z"])
    assert read_pointer(str(tmp_path))["run_id"] == "run3"
    assert sorted(r["user_id"] for r in load_id_map(spark, str(tmp_path), "dim_user").collect()) == ["a", "c"]


def test_new_ids_are_numbered_in_sorted_order_across_partitions(spark):
    existing = spark.createDataFrame([("zz", 0), ("aa", 1), ("mm", 2)], USER_MAP)
    new = [f"u{k:03d}" for k in range(200)]
    shuffled = (
        new[::7] + [i for i in new if i not in new[::7]] + ["aa", "u005"]
    )  # plus known and repeated ids
    extended, n_new = append_new_ids(existing, 3, ids(spark, "user_id", shuffled).repartition(4), "dim_user")
    assert n_new == 200
    expected = spark.createDataFrame(
        [("zz", 0), ("aa", 1), ("mm", 2), *((user, 3 + k) for k, user in enumerate(new))], USER_MAP
    )
    assert_df_equality(extended, expected, ignore_row_order=True, ignore_nullable=True)


def test_a_concurrent_update_is_refused_not_lost(spark, tmp_path, monkeypatch):
    """Two writers read the same pointer; the second to swap must fail, not reuse the first's indices."""
    update(spark, tmp_path, "run0", ["a"], ["x"])
    real_append = id_maps.append_new_ids
    interleaved = []

    def other_writer_first(existing, existing_size, new_ids, name):
        # Runs after "mine" has read the pointer (size 1) and before it swaps: "other" completes here.
        if not interleaved:
            interleaved.append(name)
            update(spark, tmp_path, "other", ["b"], ["x"])
        return real_append(existing, existing_size, new_ids, name)

    monkeypatch.setattr(id_maps, "append_new_ids", other_writer_first)
    with pytest.raises(id_maps.IdMapConflictError, match=r"CURRENT\.json changed while run mine") as raised:
        update(spark, tmp_path, "mine", ["c"], ["x"])
    assert interleaved == ["dim_user"]
    assert raised.value.exit_code == 6  # a LockHeldError: two writers ran at once
    # the other writer's update stands: b keeps index 1, c was not given it too
    assert read_pointer(str(tmp_path))["run_id"] == "other"
    assert_user_map(spark, load_id_map(spark, str(tmp_path), "dim_user"), [("a", 0), ("b", 1)])
    assert not (tmp_path / "dim_user" / "version=mine").exists()  # never current: removed
    monkeypatch.undo()

    # the refused run succeeds when rerun, numbering from the other writer's map
    rerun = update(spark, tmp_path, "mine", ["c"], ["x"])
    assert_user_map(spark, rerun.dim_user, [("a", 0), ("b", 1), ("c", 2)])


@pytest.mark.parametrize("entry", [
    {"path": "dim_user/../dim_user/version=A", "size": 1},  # loaded, then pruning deleted version=A
    {"path": "../elsewhere/version=A", "size": 1},
    {"path": "/abs/dim_user/version=A", "size": 1},
    {"path": "dim_user/version=A", "size": "1"},
])
def test_a_pointer_entry_must_be_the_map_own_version(tmp_path, entry):
    (tmp_path / "CURRENT.json").write_text(json.dumps({"format": 1, "maps": {"dim_user": entry}}))
    with pytest.raises(InputDataError, match="entry 'dim_user' .* is not"):
        read_pointer(str(tmp_path))


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[1]"])
def test_an_undecodable_or_non_object_pointer_is_a_clear_error(tmp_path, content):
    (tmp_path / "CURRENT.json").write_bytes(content)
    with pytest.raises(InputDataError, match="id map pointer"):
        read_pointer(str(tmp_path))
