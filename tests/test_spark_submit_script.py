"""./spark-submit.sh's own argument checks, which run before it builds the zip or starts Spark.

No Spark here: the script runs from a copy in a scratch "repository" (a one-file mf_spark/), with a
stand-in ``spark-submit`` first on PATH that only records that it was called. So a test can see both
that nothing was built (no dist/) and that Spark was never reached, and the real dist/ is left alone.
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from cluster import REPO_ROOT, base_env

FAKE_SPARK_SUBMIT = '#!/bin/sh\necho "$@" > "$(dirname "$0")/spark-submit.called"\nexit 0\n'


@pytest.fixture
def scratch_repo(tmp_path) -> Path:
    """A copy of spark-submit.sh next to a minimal mf_spark/, and a bin/ holding a stand-in spark-submit."""
    repo = tmp_path / "repo"
    (repo / "mf_spark").mkdir(parents=True)
    (repo / "mf_spark" / "__init__.py").write_text("")
    (repo / "job.py").write_text("")
    shutil.copy2(REPO_ROOT / "spark-submit.sh", repo / "spark-submit.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "spark-submit").write_text(FAKE_SPARK_SUBMIT)
    (bin_dir / "spark-submit").chmod(0o755)
    return repo


def run_script(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = base_env()
    env["PATH"] = f"{repo.parent / 'bin'}:{env['PATH']}"
    return subprocess.run(["./spark-submit.sh", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=30)


def test_the_stand_in_spark_submit_is_reached_by_a_good_command_line(scratch_repo):
    """The checks below mean something: with valid options the copy builds its zip and calls spark-submit."""
    done = run_script(scratch_repo, "--master", "local[1]", "--conf", "spark.ui.enabled=false", "job.py", "x")
    assert done.returncode == 0, done.stderr
    assert list((scratch_repo / "dist").glob("mf_spark-*.zip"))
    called = (scratch_repo.parent / "bin" / "spark-submit.called").read_text()
    assert called.startswith("--master local[1] --py-files ") and called.rstrip().endswith("job.py x")


@pytest.mark.parametrize("args", [
    ["--master"],
    ["--deploy-mode"],
    ["--conf"],
    ["-c"],
    ["--py-files"],
    ["--archives"],
    ["--name"],  # any other spark-submit option with a value: passed through, so it needs one too
    ["--driver-memory"],
    ["--master", "local[1]", "--conf", "spark.ui.enabled=false", "--conf"],  # last after others
    ["--zip-only", "--master"],
], ids=lambda args: " ".join(args))
def test_an_option_without_its_value_exits_2_naming_it_before_anything_runs(scratch_repo, args):
    """--master (and every option with a value) as the last argument died with bash's "unbound variable"
    (set -u) and exit 1; it is a usage error, reported before the zip is built or Spark is started."""
    done = run_script(scratch_repo, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"spark-submit.sh: {args[-1]} needs a value\n"
    assert done.stdout == ""
    assert "unbound variable" not in done.stderr
    assert "Setting default log level" not in done.stderr + done.stdout  # Spark's start-up line
    assert not (scratch_repo / "dist").exists()  # no zip built
    assert not (scratch_repo.parent / "bin" / "spark-submit.called").exists()  # spark-submit never ran


@pytest.mark.parametrize("option", ["--master", "--deploy-mode", "--conf", "--py-files", "--archives"])
def test_the_real_script_rejects_an_option_without_its_value(option):
    """The same check on ./spark-submit.sh in place (it fails before dist/ or Spark is touched)."""
    done = subprocess.run(["./spark-submit.sh", option], cwd=REPO_ROOT, env=base_env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"spark-submit.sh: {option} needs a value\n" and done.stdout == ""


@pytest.mark.parametrize("args", [["--version"], ["--master", "local[1]", "--version"]], ids=" ".join)
def test_version_is_passed_to_spark_submit_without_a_job(scratch_repo, args):
    """--version was taken as an option needing a value (exit 2); spark-submit shows its version."""
    done = run_script(scratch_repo, *args)
    assert done.returncode == 0, done.stderr
    assert (scratch_repo.parent / "bin" / "spark-submit.called").read_text() == "--version\n"
    assert not (scratch_repo / "dist").exists()  # no zip needed to show a version


def test_called_through_a_link_it_zips_the_checkout_it_links_to(scratch_repo, tmp_path):
    """Through a link in another directory it zipped <link dir>/mf_spark (absent: a zip with no code) and
    pointed SPARK_CONF_DIR at <link dir>/conf, exit 0 and no word."""
    (scratch_repo / "mf_spark" / "core.py").write_text("X = 1\n")
    (scratch_repo / "mf_spark" / "derby.log").write_text("left by a run\n")
    links = tmp_path / "links"
    links.mkdir()
    (links / "mf-spark-submit").symlink_to(scratch_repo / "spark-submit.sh")
    env = base_env()
    env["PATH"] = f"{scratch_repo.parent / 'bin'}:{env['PATH']}"
    done = subprocess.run([str(links / "mf-spark-submit"), "--zip-only"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(scratch_repo / "dist" / "mf_spark.zip")
    with zipfile.ZipFile(scratch_repo / "dist" / "mf_spark.zip") as zf:
        assert sorted(zf.namelist()) == ["mf_spark/__init__.py", "mf_spark/_build_info.json", "mf_spark/core.py"]
    assert not (links / "dist").exists()


def test_a_copy_without_mf_spark_beside_it_refuses(scratch_repo):
    shutil.rmtree(scratch_repo / "mf_spark")
    done = run_script(scratch_repo, "--zip-only")
    assert done.returncode == 2
    assert "no mf_spark/ package next to this script" in done.stderr
    assert not (scratch_repo / "dist").exists()
