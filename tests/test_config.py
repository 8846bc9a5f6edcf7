"""Config errors stop a job before Spark starts, with a message naming the key and the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mf_spark.config import ConfigError, load_config, spark_properties

REPO = Path(__file__).resolve().parents[1]
MINIMAL = '[input]\npath = "data/sample/events"\n[output]\nroot = "out"\n'


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_configs_are_valid():
    for name in ("local.toml", "cluster.toml"):
        cfg = load_config(REPO / "conf" / name)
        assert cfg["train"]["rank"] >= 1


def test_defaults_are_filled_and_relative_paths_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg["input"]["format"] == "parquet"
    assert cfg["input"]["columns"]["user_id"] == "user_id"
    assert cfg["train"]["solver"] == "cg"
    assert cfg["output"]["root"] == str(tmp_path / "out")
    assert cfg["evaluate"]["gate"]["metric"] == "ndcg@20"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("[train]\nrnak = 3\n", r"unknown key 'train\.rnak'"),
        ("[trian]\nrank = 3\n", r"unknown key 'trian'"),
        ("[train]\nrank = \"big\"\n", r"key 'train\.rank': expected an integer"),
        ("[train]\nreg_param = true\n", r"key 'train\.reg_param': expected a number"),
        ("[train]\nsolver = \"lu\"\n", r"key 'train\.solver': 'lu' is not one of cg, cholesky"),
        ("[train]\nrank = 0\n", r"key 'train\.rank': 0 is below the minimum 1"),
        # passed the schema and failed in ImplicitALS.fit, after ingest had extended the ID maps
        ("[train]\ncheckpoint_interval = -2\n", r"key 'train\.checkpoint_interval': -2 is below the minimum -1"),
        ("[train]\nconfidence_epsilon = 0.0\n", r"key 'train\.confidence_epsilon': 0\.0 must be above 0"),
        ("[evaluate]\ntest_fraction = 0.0\n", r"key 'evaluate\.test_fraction': 0\.0 must be above 0"),
        ("[input.columns]\nuser = \"u\"\n", r"unknown key 'input\.columns\.user'"),
        ("[ingest.event_types.view]\nweigth = 1.0\n", r"unknown key 'ingest\.event_types\.view\.weigth'"),
        ("[ingest.event_types.view]\nweight = \"x\"\n", r"key 'ingest\.event_types\.view\.weight': expected a number"),
        ("[evaluate]\nks = [10, \"20\"]\n", r"key 'evaluate\.ks': expected a list of integers"),
        ("[spark]\n\"sql.shuffle.partitions\" = [1]\n", r"key 'spark\.sql\.shuffle\.partitions'"),
        # TOML's inf and nan pass every `value < minimum` bound; they failed only after Spark started
        ("[ingest]\nhalf_life_days = inf\n", r"key 'ingest\.half_life_days': expected a finite number"),
        ("[ingest.event_types.view]\nweight = nan\n", r"key 'ingest\.event_types\.view\.weight': expected a finite"),
        ("[evaluate.tuning]\nalpha = [1.0, inf]\n", r"key 'evaluate\.tuning\.alpha': expected a finite number"),
        ("[ingest.event_types]\n", r"key 'ingest\.event_types': must not be empty"),
        # TOML integers are unbounded: 10**23 meaning "no limit" failed in the JVM after Spark started
        ("[ingest]\nmax_id_length = 99999999999999999999999\n", r"key 'ingest\.max_id_length': .* outside the 64-bit"),
        ("[evaluate]\nks = [10, 9223372036854775808]\n", r"key 'evaluate\.ks': .* outside the 64-bit"),
        # a column named "" passed, and failed after Spark started, the lock taken (exit 3)
        ("[input.columns]\nuser_id = \"\"\n", r"key 'input\.columns\.user_id': must not be empty"),
        ("[ingest]\nmax_reject_fraction = 1.5\n", r"key 'ingest\.max_reject_fraction': 1\.5 is above the maximum 1"),
        # every metric lies in 0..1: a gate above 1 could never pass
        ("[evaluate.gate]\nmin_value = 2.0\n", r"key 'evaluate\.gate\.min_value': 2\.0 is above the maximum 1"),
        # Spark silently ignores "spark.spark.sql.shuffle.partitions"
        ("[spark]\n\"spark.sql.shuffle.partitions\" = 4\n", r"key 'spark\.spark\.sql\.shuffle\.partitions': write "
                                                          r"\[spark\] keys without the 'spark\.' prefix"),
    ],
)
def test_each_kind_of_error_names_key_and_file(tmp_path, extra, message):
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, '[input]\npath = "x"\n')
    with pytest.raises(ConfigError, match=r"missing required key 'output\.root'"):
        load_config(path)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[input\npath = 1"))
    # both were tracebacks (exit 1) instead of config errors (exit 2)
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)
    utf16 = tmp_path / "utf16.toml"
    utf16.write_text(MINIMAL, encoding="utf-16")
    with pytest.raises(ConfigError, match=r"utf16\.toml: not valid TOML \(UTF-8\)"):
        load_config(utf16)


def test_a_byte_order_mark_is_read_past(tmp_path):
    """Notepad's UTF-8 with BOM was "not valid TOML ... (at line 1, column 1)", naming nothing."""
    with_bom = tmp_path / "bom.toml"
    with_bom.write_text(MINIMAL, encoding="utf-8-sig")
    assert load_config(with_bom)["input"] == load_config(write(tmp_path, MINIMAL))["input"]


def test_an_empty_required_path_is_refused(tmp_path):
    """output.root = "" (say, `--set output.root=$OUT` with OUT unset) put the lock, the runs, latest.json
    and a fresh id map numbering every id from 0 in the working directory, and exited 0."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"^--set 'output\.root=': key 'output\.root': must not be empty"):
        load_config(path, ["output.root="])
    with pytest.raises(ConfigError, match=r"key 'input\.path': must not be empty"):
        load_config(write(tmp_path, '[input]\npath = " "\n[output]\nroot = "out"\n', name="blank.toml"))


def test_a_url_output_root_is_refused_at_load_and_file_urls_are_local(tmp_path):
    """An s3a:// root passed until the ID-map swap, after Spark started and the whole ingest ran, and left
    a local ./s3a:/... directory holding a lock and a run."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"^--set 'output\.root=s3a://b/r': key 'output\.root' = 's3a://b/r' "
                                          r"must be a local or NFS \(POSIX\) path, not a URL"):
        load_config(path, ["output.root=s3a://b/r"])
    hdfs = write(tmp_path, MINIMAL.replace('root = "out"', 'root = "hdfs://nn/r"'), name="hdfs.toml")
    with pytest.raises(ConfigError, match=r"hdfs\.toml: key 'output\.root' = 'hdfs://nn/r' must be a local"):
        load_config(hdfs)
    assert load_config(path, [f"output.root=file://{tmp_path}/r"])["output"]["root"] == str(tmp_path / "r")


def test_a_date_given_for_a_date_string_is_taken(tmp_path):
    """`--set evaluate.cutoff_date=2011-12-01` parses as a TOML date and was refused as not a string."""
    path = write(tmp_path, MINIMAL)
    assert load_config(path, ["evaluate.cutoff_date=2011-12-01"])["evaluate"]["cutoff_date"] == "2011-12-01"
    unquoted = write(tmp_path, MINIMAL + "[evaluate]\ncutoff_date = 2011-12-01\n", name="unquoted.toml")
    assert load_config(unquoted)["evaluate"]["cutoff_date"] == "2011-12-01"


def test_setting_one_event_type_entry_keeps_the_default_types(tmp_path):
    """With no [ingest.event_types] in the file, `--set ingest.event_types.purchase.value_cap=100` built a
    table of purchase alone: returns became unknown_event_type and purchases lost use_value."""
    cfg = load_config(write(tmp_path, MINIMAL), ["ingest.event_types.purchase.value_cap=100"])
    types = cfg["ingest"]["event_types"]
    assert set(types) == {"purchase", "return"}
    assert types["purchase"] == {"weight": 1.0, "use_value": True, "value_cap": 100.0, "absolute_value": False}
    assert types["return"]["weight"] == -1.0
    # a table in the file still replaces the defaults as a whole, and --set edits that table
    own = write(tmp_path, MINIMAL + "[ingest.event_types.view]\nweight = 0.5\n", name="own.toml")
    types = load_config(own, ["ingest.event_types.click.weight=2"])["ingest"]["event_types"]
    assert set(types) == {"view", "click"}
    with pytest.raises(ConfigError, match=r"key 'ingest\.event_types': must not be empty"):
        load_config(write(tmp_path, MINIMAL), ["ingest.event_types={}"])


def test_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["train.rank=64", "train.solver=cholesky", "spark.sql.shuffle.partitions=8",
                             "ingest.event_types.view.weight=2", "evaluate.ks=[5, 10]"])
    assert cfg["train"]["rank"] == 64 and cfg["train"]["solver"] == "cholesky"
    assert spark_properties(cfg)["spark.sql.shuffle.partitions"] == "8"
    assert cfg["ingest"]["event_types"]["view"]["weight"] == 2.0
    assert {"purchase", "return"} < set(cfg["ingest"]["event_types"])  # added to the defaults
    assert cfg["evaluate"]["ks"] == [5, 10]
    # The error names the --set that caused it, not the file (which says rank = whatever it says).
    with pytest.raises(ConfigError, match=r"^--set 'train\.rank=lots': key 'train\.rank': expected an integer"):
        load_config(path, ["train.rank=lots", "train.alpha=2.0"])
    with pytest.raises(ConfigError, match=r"^--set 'train\.rnak=8': unknown key 'train\.rnak'"):
        load_config(path, ["train.rnak=8"])
    with pytest.raises(ConfigError, match=r"^--set 'spark\.sql\.shuffle\.partitions=\[1\]': key 'spark\.sql"):
        load_config(path, ["spark.sql.shuffle.partitions=[1]"])
    with pytest.raises(ConfigError, match=r"^--set 'ingest\.event_types\.view\.weight=\"x\"': key"):
        load_config(path, ['ingest.event_types.view.weight="x"'])
    # An error in the file itself still names the file, whatever else was overridden.
    bad = write(tmp_path, MINIMAL + "[train]\nrank = -1\n", name="bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: key 'train\.rank'"):
        load_config(bad, ["train.alpha=2.0"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["train.rank"])


def test_an_error_in_a_set_names_the_set_even_for_tables_it_made(tmp_path):
    """--set trian.rank=3 was reported as "<file>: unknown key 'trian'": the file has no trian."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"^--set 'trian\.rank=3': unknown key 'trian'"):
        load_config(path, ["trian.rank=3"])
    with pytest.raises(ConfigError, match=r"^--set 'train \. rank=16': unknown key 'train '"):
        load_config(path, ["train . rank=16"])
    with pytest.raises(ConfigError, match=r"^--set 'ingest\.event_types\.purchase=2': key "
                                          r"'ingest\.event_types\.purchase': expected a table, got 2$"):
        load_config(path, ["ingest.event_types.purchase=2"])
    for text in ("spark.spark.sql.shuffle.partitions=4", 'spark."sql.shuffle.partitions"=4'):
        with pytest.raises(ConfigError, match=rf"^--set '{text}': key .*without the 'spark\.' prefix and unquoted"):
            load_config(path, [text])


def test_paths_that_cannot_be_paths_are_config_errors(tmp_path):
    """~nosuchuser, an embedded NUL and a name over 255 bytes were tracebacks (exit 1)."""
    from mf_spark.publish import check_output_root, check_writable_root

    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"^--set 'output\.root=~nosuchuser-mf/out': key 'output\.root' = "
                                          r"'~nosuchuser-mf/out' is not a usable path: "):
        load_config(path, ["output.root=~nosuchuser-mf/out"])
    with pytest.raises(ConfigError, match=r"job\.toml: key 'input\.path' = .* is not a usable path: .*null"):
        load_config(write(tmp_path, MINIMAL.replace("data/sample/events", "data\\u0000x")))
    long_root = str(tmp_path / ("x" * 300) / "out")
    with pytest.raises(ConfigError, match=r"cannot be used: .* cannot be a directory: File name too long"):
        check_writable_root(long_root)
    with pytest.raises(ConfigError, match=r"cannot be a directory: File name too long"):
        check_output_root(long_root)


def test_environment_variables_in_paths_are_refused_not_taken_literally(tmp_path):
    """output.root = "$HOME/out" in a config made a directory named "$HOME" in the working directory."""
    path = write(tmp_path, MINIMAL.replace('root = "out"', 'root = "$HOME/out"'))
    with pytest.raises(ConfigError, match=r"job\.toml: key 'output\.root' = '\$HOME/out': "
                                          r"environment variables \(\$HOME\) are not expanded"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"job\.toml: key 'input\.path' = .*\(\$\{DATA\}\) are not expanded"):
        load_config(write(tmp_path, MINIMAL.replace("data/sample/events", "${DATA}/events")))
    # what the error advises, a --set, is taken as it is (the shell had its chance), and so is a URL:
    # `$` is legal in object-store names (Azure's $logs container, S3 keys)
    path = write(tmp_path, MINIMAL)
    assert load_config(path, ["output.root=/tmp/x$y/out"])["output"]["root"] == "/tmp/x$y/out"
    for url in ("abfss://$logs@acct.dfs.core.windows.net/events", "s3a://bucket/price$usd/events"):
        assert load_config(write(tmp_path, MINIMAL.replace("data/sample/events", url)))["input"]["path"] == url


def test_spark_tables_are_flattened(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "[spark]\nsql.shuffle.partitions = 3\n\"ui.enabled\" = false\n"))
    props = spark_properties(cfg)
    assert props["spark.sql.shuffle.partitions"] == "3"
    assert props["spark.ui.enabled"] == "false"


@pytest.mark.parametrize("job", ["jobs/nightly.py", "jobs/train.py"])
def test_job_exits_with_clear_message_and_no_traceback(tmp_path, job):
    path = write(tmp_path, MINIMAL + "[train]\nrank = -1\n")
    args = [sys.executable, job, "--config", str(path)]
    args += ["--date", "2011-12-09"] if "nightly" in job else ["--interactions", "x", "--model-out", "y"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "train.rank" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nightly_needs_a_date_or_a_range(tmp_path):
    path = write(tmp_path, MINIMAL)
    proc = subprocess.run([sys.executable, "jobs/nightly.py", "--config", str(path), "--from", "2011-12-01"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "--date" in proc.stderr and "Traceback" not in proc.stderr


def test_a_huge_lookback_or_an_extreme_run_date_is_a_usage_error(tmp_path):
    """lookback_days = 800000, or --date 9999-12-31 (the window's end is the day after), raised
    OverflowError in the window arithmetic: exit 1 with a traceback."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"key 'ingest\.lookback_days': 800000 is above the maximum 36500"):
        load_config(path, ["ingest.lookback_days=800000"])
    for date in ("9999-12-31", "0001-01-05"):
        proc = subprocess.run([sys.executable, "jobs/nightly.py", "--config", str(path), "--date", date],
                              cwd=REPO, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)})
        assert proc.returncode == 2 and f"'{date}' is outside 1900-01-01 .. 9999-12-30" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_configuration_reference_is_current():
    proc = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_configuration_reference_script_explains_itself_and_writes_nothing():
    """--help (or a mistyped option) rewrote docs/configuration.md: any argument but --check was ignored."""
    target = REPO / "docs" / "configuration.md"
    before = target.stat().st_mtime_ns
    shown = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--help"], cwd=REPO,
                           capture_output=True, text=True)
    assert shown.returncode == 0 and "--check" in shown.stdout and "SCHEMA" in shown.stdout
    typo = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--chek"], cwd=REPO,
                          capture_output=True, text=True)
    assert typo.returncode == 2 and "--chek" in typo.stderr
    assert target.stat().st_mtime_ns == before


def test_nightly_checks_evaluate_settings_before_spark(tmp_path):
    root = tmp_path / "out"
    path = write(tmp_path, MINIMAL.replace('"out"', f'"{root}"') + '[evaluate]\nmodels = ["implicit_als", "deep_magic"]\n')
    proc = subprocess.run([sys.executable, "jobs/nightly.py", "--config", str(path), "--date", "2011-12-09"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "deep_magic" in proc.stderr and "Traceback" not in proc.stderr
    # before Spark and before the run: no session (its start-up line) and no output root
    assert "Setting default log level" not in proc.stderr and not root.exists()


def test_cut_offs_above_the_largest_k_are_refused_in_config_and_library(spark):
    """evaluate.ks = [20, 2**63 - 1] passed, ran the whole nightly, then failed in the JVM (exit 1);
    K = 20000 spent 80 s on the ideal-DCG table before any metric."""
    from mf_spark.config import validate
    from mf_spark.evaluate.holdout import evaluate_holdout, validate_settings
    from mf_spark.evaluate.metrics import MAX_K, parse_metric_name

    evaluate = validate({"input": {"path": "x"}, "output": {"root": "y"}})["evaluate"]
    validate_settings({**evaluate, "ks": [20, MAX_K]})
    with pytest.raises(ConfigError, match=rf"^key 'evaluate\.ks': need cut-offs K from 1 to {MAX_K}, got \[20, 1001\]"):
        validate_settings({**evaluate, "ks": [20, MAX_K + 1]})
    with pytest.raises(ConfigError, match=r"key 'evaluate\.gate\.metric': .* K from 1 to 1000, got 'ndcg@5000'"):
        validate_settings({**evaluate, "gate": {**evaluate["gate"], "metric": "ndcg@5000"}})
    assert parse_metric_name(f"recall@{MAX_K}") == ("recall", MAX_K)
    df = spark.createDataFrame([(0, 1, 1.0)], "user_idx int, item_idx int, strength float")
    with pytest.raises(ValueError, match="need cut-offs K from 1 to 1000, got \\[0, 20\\]"):
        evaluate_holdout(spark, df, split="user_random", models=["popular"], ks=[0, 20])
    with pytest.raises(ValueError, match="need cut-offs K from 1 to 1000"):
        evaluate_holdout(spark, df, split="user_random", models=["popular"], ks=[20, 5000])


@pytest.mark.parametrize("args, message", [
    # spark-submit's --conf placed after the job file was taken as --config (abbreviation), --dat as --date
    (["jobs/nightly.py", "--config", "{cfg}", "--dat", "2011-12-09"], "unrecognized arguments: --dat"),
    (["jobs/nightly.py", "--conf", "spark.sql.shuffle.partitions=3", "--config", "{cfg}", "--date", "2011-12-09"],
     "unrecognized arguments: --conf"),
    # an unset scheduler variable: rollback crashed (exit 1), train ran the whole fit, then crashed
    (["jobs/rollback.py", "--config", "{cfg}", "--to", ""], "argument --to: must not be empty"),
    (["jobs/train.py", "--config", "{cfg}", "--interactions", "x", "--model-out", ""],
     "argument --model-out: must not be empty"),
    (["jobs/recommend.py", "--config", "{cfg}", "--run-dir", " "], "argument --run-dir: must not be empty"),
    (["jobs/evaluate.py", "--config", "{cfg}", "--date", "2011-12-09", "--out", ""], "argument --out: must not be empty"),
])
def test_abbreviated_or_empty_arguments_are_usage_errors(tmp_path, args, message):
    path = write(tmp_path, MINIMAL.replace('"out"', f'"{tmp_path / "out"}"'))
    proc = subprocess.run([sys.executable] + [a.format(cfg=path) for a in args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("split, test_fraction, test_n, refused", [
    ("user_temporal", 1.0, 0, True),
    ("user_random", 1.5, 0, True),
    ("strong_generalization", 1.0, 3, True),
    ("user_temporal", 1.0, 3, False),  # test_n replaces the fraction
    ("global_temporal", 1.5, 0, False),  # the cutoff date replaces it
    ("user_temporal", 0.5, 0, False),
])
def test_a_test_fraction_of_one_or_more_is_refused_where_the_split_uses_it(
    tmp_path, split, test_fraction, test_n, refused
):
    """Before, 1.0 and 1.5 passed and the nightly failed after training with a bare ValueError."""
    from mf_spark.evaluate.holdout import validate_settings

    evaluate = load_config(write(tmp_path, MINIMAL))["evaluate"]
    evaluate.update(split=split, test_fraction=test_fraction, test_n=test_n, cutoff_date="2011-12-01")
    if refused:
        with pytest.raises(ConfigError, match=r"key 'evaluate\.test_fraction': the \w+ split needs a fraction"):
            validate_settings(evaluate)
    else:
        validate_settings(evaluate)


def test_reader_options_accept_toml_scalars_and_reach_spark_as_strings(tmp_path):
    """`--set input.options.header=true` is a TOML boolean; it failed with "expected a string"."""
    cfg = load_config(write(tmp_path, MINIMAL), ["input.options.header=true", "input.options.samplingRatio=0.5",
                                                 'input.options.sep=";"'])
    assert cfg["input"]["options"] == {"header": "true", "samplingRatio": "0.5", "sep": ";"}


def test_driver_jvm_settings_in_the_config_are_called_ineffective(tmp_path, caplog):
    from mf_spark.cli import warn_about_driver_settings

    cfg = load_config(write(tmp_path, MINIMAL + '[spark]\n"driver.memory" = "1g"\n'), ["spark.executor.memory=2g"])
    with caplog.at_level("WARNING", logger="mf_spark"):
        assert warn_about_driver_settings(cfg) == ["driver.memory"]
    [record] = caplog.records
    assert "spark.driver.memory in the [spark] table" in record.getMessage() and "has no effect" in record.getMessage()


# Mutation testing found these bounds and parsing rules unguarded.

def test_a_maximum_itself_and_int64_max_are_accepted(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["ingest.max_reject_fraction=1.0", "evaluate.gate.min_value=1.0",
                             "ingest.lookback_days=36500", "ingest.max_id_length=9223372036854775807"])
    assert cfg["ingest"]["max_reject_fraction"] == 1.0 and cfg["ingest"]["lookback_days"] == 36500
    assert cfg["ingest"]["max_id_length"] == 2**63 - 1


def test_a_boolean_is_not_an_integer(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'train\.rank': expected an integer"):
        load_config(write(tmp_path, MINIMAL + "[train]\nrank = true\n"))


def test_spark_properties_that_prefix_one_another_and_values_with_equals(tmp_path):
    props = spark_properties(load_config(write(tmp_path, MINIMAL), [
        "spark.speculation=true", "spark.speculation.multiplier=2", "spark.executor.extraJavaOptions=-Dx=1"]))
    assert props["spark.speculation"] == "true" and props["spark.speculation.multiplier"] == "2"
    assert props["spark.executor.extraJavaOptions"] == "-Dx=1"


def test_a_relative_file_url_is_resolved_and_a_remote_input_url_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, MINIMAL)
    assert load_config(path, ["output.root=file://rel/out"])["output"]["root"] == str(tmp_path / "rel" / "out")
    assert load_config(path, ["input.path=s3a://bucket/events"])["input"]["path"] == "s3a://bucket/events"


def test_a_set_without_a_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="must name a section and a key"):
        load_config(write(tmp_path, MINIMAL), ["rank=64"])


def test_loaded_configs_do_not_share_their_defaults(tmp_path):
    path = write(tmp_path, MINIMAL)
    first = load_config(path)
    first["evaluate"]["ks"].append(7)
    first["evaluate"]["models"].clear()
    second = load_config(path)
    assert second["evaluate"]["ks"] == [10, 20, 50, 100] and second["evaluate"]["models"] == ["implicit_als", "popular"]
