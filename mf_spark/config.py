"""Job configuration: TOML files validated against one declared schema.

Every key the project reads is declared in :data:`SCHEMA` with its type, default and meaning, so an
unknown key, a wrong type or a missing required key stops a job *before Spark starts*, with a message
naming the key and the file. Values can be overridden on the command line with
``--set section.key=value`` (the value is parsed as TOML, falling back to a plain string).

Config parsing lives here and nowhere else; library functions take plain values, never this dict.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mf_spark.errors import ConfigError


def parse_iso_date(text: str) -> dt.date:
    """``text`` as a ``YYYY-MM-DD`` date; ``ValueError`` for anything else.

    ``date.fromisoformat`` also takes ``2011-W49`` (a Monday), ``2011W495`` and ``20111209``: a typo
    became another run date or cutoff without a word.
    """
    if not (len(text) == 10 and text.isascii() and text[4] == text[7] == "-" and text.replace("-", "").isdigit()):
        raise ValueError(f"not a date in YYYY-MM-DD form: {text!r}")
    return dt.date.fromisoformat(text)


def utc_midnight_micros(day: dt.date) -> int:
    """Microseconds since the epoch of midnight UTC at the start of ``day``.

    Compare ``unix_micros(ts)`` with it rather than a date or datetime literal: Spark turns those into
    instants in the session time zone (and, before 1900, rebases them with the JVM's zone).
    """
    return (day - dt.date(1970, 1, 1)).days * 86_400_000_000


@dataclass(frozen=True)
class Key:
    """One configuration key.

    ``type`` is one of ``str, int, float, bool, list[int], list[float], list[str], table``; ``choices`` restricts
    strings; ``required`` keys have no default.
    """

    type: str
    default: Any = None
    doc: str = ""
    required: bool = False
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    above_minimum: bool = False  # the value must exceed ``minimum`` (a divisor or a log's scale)
    maximum: float | None = None


@dataclass(frozen=True)
class MapOf:
    """A table whose keys are free (event types, Spark properties) and whose values share a schema.

    ``value`` is either a type name (``str``, ``float``, ``scalar``) or a dict of :class:`Key` for
    tables of records (``[ingest.event_types.purchase]``).
    """

    value: str | dict[str, Key]
    default: dict[str, Any] = field(default_factory=dict)
    doc: str = ""
    non_empty: bool = False  # an empty table is refused (event types: every event would be rejected)


SCHEMA: dict[str, dict[str, Key | MapOf | dict[str, Key]]] = {
    "input": {
        "path": Key("str", required=True, doc="raw event table (file or directory); a relative path is resolved against the working directory"),
        "format": Key("str", "parquet", "reader format", choices=("parquet", "csv", "json")),
        "columns": {
            "user_id": Key("str", "user_id", "raw column holding the user id"),
            "item_id": Key("str", "item_id", "raw column holding the item id"),
            "event_type": Key("str", "event_type", "raw column holding the event type"),
            "event_ts": Key("str", "event_ts", "raw column holding the event timestamp"),
            "value": Key("str", "value", "raw column holding the event value (play count, quantity, dwell); may be absent when no event type uses values"),
            "event_date": Key("str", "event_date", "Hive partition column (event_date=YYYY-MM-DD directories) used to prune the window; ignored when the input is not partitioned by it"),
        },
        "options": MapOf("scalar", {}, "reader options passed to Spark, e.g. header = true for CSV (Spark receives strings: true -> \"true\")"),
    },
    "output": {
        "root": Key("str", required=True, doc="root directory of all outputs (runs/, id_maps/, latest.json)"),
    },
    "spark": MapOf("scalar", {}, "Spark properties without the 'spark.' prefix, passed to the session; driver JVM settings (driver.memory, driver.extraJavaOptions) have no effect here (a warning says so): give them to ./spark-submit.sh"),
    "ingest": {
        "lookback_days": Key("int", 365, "events with event date in [D - lookback + 1, D] are used", minimum=1,
                             maximum=36500),
        "half_life_days": Key("float", 0.0, "exponential time decay half-life in days relative to the run date; 0 = off", minimum=0),
        "max_id_length": Key("int", 256, "ids longer than this are rejected", minimum=1),
        "min_events_per_user": Key("int", 1, "users with fewer accepted (user,item) pairs are dropped", minimum=1),
        "min_events_per_item": Key("int", 1, "items with fewer accepted (user,item) pairs are dropped", minimum=1),
        "k_core": Key("bool", False, "iterate the two minimum filters until both hold (k-core)"),
        "max_events_per_user_day": Key("int", 0, "bot rule: users above this many events on any day are rejected whole; 0 = off", minimum=0),
        "max_reject_fraction": Key("float", 0.05, "fail the run (exit 4) when the counted rejects exceed this fraction of the rows read in the window (docs/ingest.md: rows before or after the window, and the support filters, do not count)", minimum=0, maximum=1),
        "event_types": MapOf(
            {
                "weight": Key("float", 1.0, "weight of one event of this type; negative = confident dislike"),
                "use_value": Key("bool", False, "multiply the weight by the event's value (null counts as 1)"),
                "value_cap": Key("float", 0.0, "cap on the value before multiplying; 0 = no cap", minimum=0),
                "absolute_value": Key("bool", False, "use the absolute value (sources storing returns as negative quantities); a negative value is then not rejected"),
            },
            # Defaults suit the embedded Online Retail sample: quantity-weighted purchases capped at 50
            # units (purchase quantities: 95th percentile 36, 98th 96), and returns, stored with negative
            # quantities, subtracting the same.
            {
                "purchase": {"weight": 1.0, "use_value": True, "value_cap": 50.0},
                "return": {"weight": -1.0, "use_value": True, "value_cap": 50.0, "absolute_value": True},
            },
            "event types accepted and their weights; any other type is rejected as unknown_event_type; a config table replaces these defaults as a whole (a --set of one entry without a table in the file changes that entry of these defaults)",
            non_empty=True,
        ),
    },
    "train": {
        "rank": Key("int", 32, "number of latent factors", minimum=1),
        "max_iter": Key("int", 10, "iterations of a cold start", minimum=1),
        "reg_param": Key("float", 0.1, "regularisation lambda (scaled per train.regularization); 0 bounds nothing: a "
                         "nearly singular system then solves without error to factors of huge norm", minimum=0),
        "alpha": Key("float", 10.0, "confidence scale: c = 1 + alpha * |r|", minimum=0),
        "solver": Key("str", "cg", "least-squares solver", choices=("cg", "cholesky")),
        "cg_steps": Key("int", 3, "conjugate gradient steps per half-iteration", minimum=1),
        "regularization": Key("str", "count", "lambda scaling", choices=("count", "constant", "frequency")),
        "confidence": Key("str", "linear", "confidence function of the strength", choices=("linear", "log")),
        "confidence_epsilon": Key("float", 1.0, "epsilon of the log confidence", minimum=0,
                                  above_minimum=True),
        "frequency_alpha0": Key("float", 0.1, "alpha0 of frequency regularisation", minimum=0),
        "frequency_nu": Key("float", 1.0, "exponent nu of frequency regularisation", minimum=0),
        "num_user_blocks": Key("int", 4, "user blocks", minimum=1),
        "num_item_blocks": Key("int", 4, "item blocks", minimum=1),
        "checkpoint_interval": Key("int", 5, "checkpoint the factors every N iterations; 0 or -1 = never",
                                   minimum=-1),
        "seed": Key("int", 42, "random seed of the initial factors"),
        "warm_start": Key("bool", True, "warm-start from the last published model when one exists"),
        "warm_start_iterations": Key("int", 5, "iterations when warm-started", minimum=1),
    },
    "recommend": {
        "top_n": Key("int", 100, "recommendations per user", minimum=1),
        "similar_n": Key("int", 20, "similar items per item", minimum=1),
        "exclude_seen": Key("bool", True, "exclude items the user interacted with in the training window"),
        "fold_in_new_users": Key("bool", True, "solve factors for users with history but no factors"),
        "item_filter_path": Key("str", "", "optional Parquet table of item_id to remove for everyone"),
        "allow_list_path": Key("str", "", "optional Parquet table of item_id; only these are recommended"),
        "user_block_size": Key("int", 4096, "users scored together in one block", minimum=1),
        "item_chunk_size": Key("int", 50000, "items per chunk when the item matrix is crossed with the user blocks instead of broadcast", minimum=1),
        "broadcast_max_mb": Key("int", 128, "broadcast the item factors to every task when they take at most this many MiB (float32)", minimum=0),
    },
    "evaluate": {
        "enabled": Key("bool", True, "run the holdout evaluation and the quality gate in the nightly"),
        "split": Key("str", "user_temporal", "split protocol", choices=("user_temporal", "global_temporal", "user_random", "strong_generalization")),
        "test_fraction": Key("float", 0.2, "fraction of each user's interactions held out, strictly between 0 and 1", minimum=0, above_minimum=True),
        "test_n": Key("int", 0, "hold out each user's last n instead of a fraction; 0 = use test_fraction", minimum=0),
        "cutoff_date": Key("str", "", "global_temporal: test = pairs first met after this UTC day (YYYY-MM-DD)"),
        "holdout_users": Key("int", 100, "strong_generalization: number of held-out users", minimum=1),
        "seed": Key("int", 7, "seed of random splits"),
        "ks": Key("list[int]", [10, 20, 50, 100], "cut-offs K of every metric, from 1 to 1000 (evaluate.metrics.MAX_K)"),
        "models": Key("list[str]", ["implicit_als", "popular"],
                      "models compared, the first is the one the gate reads: implicit_als, implicit_als_cholesky, mllib_als, popular, random"),
        "tuning": {
            "metric": Key("str", "ndcg@20", "metric the tuning maximises on the validation split, name@K"),
            "mode": Key("str", "grid", "search every combination, a seeded random sample of them, a seeded random start refined by steps to neighbouring grid values, or (cover) MLlib's part of the grid refined the same way (see docs/evaluation.md)", choices=("grid", "random", "refine", "cover")),
            "samples": Key("int", 8, "random, refine and cover modes: distinct parameter sets tried per model", minimum=1),
            "validation_splits": Key("int", 1, "validation splits whose mean metric scores a parameter set (random and strong_generalization splits; a temporal split has one)", minimum=1),
            "rank": Key("list[int]", [32, 64], "ranks searched"),
            "reg_param": Key("list[float]", [0.01, 0.1], "regularisation lambdas searched"),
            "alpha": Key("list[float]", [5.0, 20.0], "confidence scales searched"),
            "regularization": Key("list[str]", ["count"], "lambda scalings searched (MLlib: count only); frequency_alpha0 and frequency_nu are searched under frequency"),
            "confidence": Key("list[str]", ["linear"], "confidence functions searched"),
            "frequency_alpha0": Key("list[float]", [], "alpha0 values of frequency regularisation searched (ImplicitALS only; empty = train.frequency_alpha0)"),
            "frequency_nu": Key("list[float]", [], "nu values of frequency regularisation searched (ImplicitALS only; empty = train.frequency_nu)"),
        },
        "gate": {
            "enabled": Key("bool", True, "stop publishing when the gate fails"),
            "metric": Key("str", "ndcg@20", "metric the gate checks, name@K"),
            "min_value": Key("float", 0.0, "minimum value of the metric (every metric lies in 0..1)", minimum=0, maximum=1),
            "max_relative_drop": Key("float", 0.5, "maximum relative drop against the previous published run", minimum=0),
        },
    },
    "publish": {
        "keep_runs": Key("int", 7, "published runs kept: those of the newest run dates; the one latest.json names, and the one it named before the last publication, are never deleted", minimum=1),
    },
}

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "list[int]": "a list of integers", "list[float]": "a list of numbers", "list[str]": "a list of strings", "scalar": "a string, number or boolean"}


def _check_value(key: Key | str, value: Any, where: str) -> Any:
    type_name = key.type if isinstance(key, Key) else key
    ok: bool
    if type_name == "str" and type(value) is dt.date:
        value = value.isoformat()  # cutoff_date = 2011-12-01 unquoted (or --set) is a TOML date
    if type_name == "str":
        ok = isinstance(value, str)
    elif type_name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_name == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif type_name == "bool":
        ok = isinstance(value, bool)
    elif type_name == "list[int]":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    elif type_name == "list[float]":
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if ok:
            value = [float(v) for v in value]
    elif type_name == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif type_name == "scalar":
        ok = isinstance(value, (str, int, float, bool))
    else:  # pragma: no cover - schema bug
        raise AssertionError(type_name)
    if not ok:
        raise ConfigError(f"{where}: expected {_TYPE_NAMES[type_name]}, got {value!r} ({type(value).__name__})")
    # TOML integers are unbounded; Spark's are 64-bit: 10**23 passed here and failed in the JVM
    if any(isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX
           for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"{where}: {value!r} is outside the 64-bit integer range")
    # TOML has inf and nan; `nan < minimum` is False, so they would pass every bound below
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    # a key with a non-empty default (a column name, a metric) has no meaning when empty either
    if isinstance(key, Key) and (key.required or key.default) and isinstance(value, str) and not value.strip():
        raise ConfigError(f"{where}: must not be empty ({key.doc})")
    if isinstance(key, Key):
        if key.choices and value not in key.choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(key.choices)}")
        if key.minimum is not None and value < key.minimum:
            raise ConfigError(f"{where}: {value!r} is below the minimum {key.minimum:g}")
        if key.above_minimum and value == key.minimum:
            raise ConfigError(f"{where}: {value!r} must be above {key.minimum:g}")
        if key.maximum is not None and value > key.maximum:
            raise ConfigError(f"{where}: {value!r} is above the maximum {key.maximum:g}")
    return value


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _validate_table(
    schema: dict[str, Any], raw: dict[str, Any], path: str, source: str, overridden: dict[str, str] | None = None,
) -> dict[str, Any]:
    overridden = overridden or {}

    def origin(key: str) -> str:
        # A value set on the command line is reported against that --set, not against the file; so is
        # an unknown or mistyped table the --set itself made (--set trian.rank=3 names 'trian').
        for dotted, text in overridden.items():
            if dotted == key or dotted.startswith(key + "."):
                return f"--set {text!r}"
        return source

    result: dict[str, Any] = {}
    for name in raw:
        if name not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"{origin(path + name)}: unknown key '{path}{name}' (known keys here: {known})")
    for name, spec in schema.items():
        where = f"{origin(path + name)}: key '{path}{name}'"
        present = name in raw
        value = raw.get(name)
        if isinstance(spec, Key):
            if not present:
                if spec.required:
                    raise ConfigError(f"{source}: missing required key '{path}{name}' ({spec.doc})")
                result[name] = copy.deepcopy(spec.default)
            else:
                result[name] = _check_value(spec, value, where)
        elif isinstance(spec, MapOf):
            value = copy.deepcopy(spec.default) if not present else value
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a table, got {value!r}")
            if spec.non_empty and not value:
                raise ConfigError(f"{where}: must not be empty ({spec.doc})")
            if isinstance(spec.value, dict):
                result[name] = {
                    sub: _validate_table(spec.value,
                                         _as_table(v, f"{origin(f'{path}{name}.{sub}')}: key '{path}{name}.{sub}'"),
                                         f"{path}{name}.{sub}.", source, overridden)
                    for sub, v in value.items()
                }
            else:
                flat = _flatten(value)
                result[name] = {
                    sub: _check_value(spec.value, v, f"{origin(f'{path}{name}.{sub}')}: key '{path}{name}.{sub}'")
                    for sub, v in flat.items()
                }
        else:
            value = {} if not present else value
            result[name] = _validate_table(spec, _as_table(value, where), f"{path}{name}.", source, overridden)
    return result


def _as_table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    return value


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw_value = text.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {text!r}: the key must name a section and a key, e.g. train.rank=64")
    if parts[0] == "spark":  # Spark properties contain dots themselves
        parts = ["spark", ".".join(parts[1:])]
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value
    return parts, value


def _schema_at(parts: list[str]) -> Any:
    """The schema entry at a dotted path (a table, a :class:`Key` or a :class:`MapOf`), or None."""
    spec: Any = SCHEMA
    for part in parts:
        if not isinstance(spec, dict) or part not in spec:
            return None
        spec = spec[part]
    return spec


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` override applied.

    An override inside a free table the file does not have (``ingest.event_types.purchase.value_cap``)
    starts from that table's defaults: the file's table replaces them as a whole, but a ``--set`` of one
    entry must not drop the others.
    """
    merged = copy.deepcopy(raw)
    for text in overrides:
        parts, value = _parse_override(text)
        table = merged
        for depth, part in enumerate(parts[:-1], 1):
            spec = _schema_at(parts[:depth])
            if part not in table and isinstance(spec, MapOf):
                table[part] = copy.deepcopy(spec.default)
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a table")
        table[parts[-1]] = value
    return merged


def validate(
    raw: dict[str, Any], source: str = "<config>", overridden: dict[str, str] | None = None
) -> dict[str, Any]:
    """Validate a raw config dict against :data:`SCHEMA` and fill in the defaults.

    ``overridden`` maps dotted keys set with ``--set`` to the override's text, so that an error in one
    of them names the ``--set``, not the file.
    """
    return _validate_table(SCHEMA, raw, "", source, overridden)


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read, override and validate a TOML config file.

    Relative ``input.path``, ``output.root``, ``recommend.item_filter_path`` and
    ``recommend.allow_list_path`` are resolved against the current directory so that jobs
    started from the repository root find the embedded sample.

    Raises
    ------
    ConfigError
        With a message naming the file and the key.
    """
    path = Path(path)
    source = str(path)
    try:
        # utf-8-sig: Windows editors save a byte-order mark, which tomllib reports as an invalid
        # character at line 1 without naming it.
        raw = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML (UTF-8): {exc}") from None
    overridden = {}
    for text in overrides or []:
        parts, _ = _parse_override(text)
        overridden[".".join(parts)] = text
    cfg = validate(apply_overrides(raw, overrides or []), source, overridden)

    def origin(dotted: str) -> str:
        return f"--set {overridden[dotted]!r}" if dotted in overridden else source

    root = cfg["output"]["root"]
    if root.startswith("file://"):
        cfg["output"]["root"] = root[len("file://"):]
    elif "://" in root:
        # Refused here, before Spark starts: it used to pass until the ID-map swap, after the whole ingest,
        # leaving a local "./s3a:/..." directory with a lock and a run in it.
        raise ConfigError(f"{origin('output.root')}: key 'output.root' = {root!r} must be a local or NFS (POSIX) path, not a "
                          "URL: publishing swaps files with rename(2) (docs/operations.md, Storage)")
    for section, key in (("input", "path"), ("output", "root"), ("recommend", "item_filter_path"), ("recommend", "allow_list_path")):
        value = cfg[section][key]
        if value and "://" not in value:
            # Only a local path written in the file: `$` is legal in object-store keys (abfss://$logs@...,
            # s3a://.../price$usd), and a --set value has been through the shell already.
            variable = None if f"{section}.{key}" in overridden else _ENV_VARIABLE.search(value)
            if variable:
                # Not expanded: "$HOME/out" would quietly become a directory named "$HOME" in the working directory.
                raise ConfigError(f"{origin(f'{section}.{key}')}: key '{section}.{key}' = {value!r}: environment "
                                  f"variables ({variable.group(0)}) are not expanded in the config; let the shell "
                                  f"expand it in an override, --set \"{section}.{key}=...\" (a --set value is taken "
                                  "as it is)")
            try:
                cfg[section][key] = str(Path(value).expanduser().resolve())
            except (OSError, RuntimeError, ValueError) as exc:  # ~nosuchuser, an embedded NUL
                raise ConfigError(f"{origin(f'{section}.{key}')}: key '{section}.{key}' = {value!r} is not a usable path: {exc}") from None
    for name in cfg["spark"]:
        if name.startswith("spark.") or '"' in name or "'" in name:
            # Spark ignores the resulting "spark.spark.sql..." without a word
            raise ConfigError(f"{origin(f'spark.{name}')}: key 'spark.{name}': write [spark] keys without the 'spark.' prefix and "
                              "unquoted, e.g. sql.shuffle.partitions = 4 or --set spark.sql.shuffle.partitions=4")
    # Spark's reader options are strings; `--set input.options.header=true` parses as a TOML boolean.
    cfg["input"]["options"] = {
        name: (str(value).lower() if isinstance(value, bool) else str(value))
        for name, value in cfg["input"]["options"].items()
    }
    cfg["_source"] = source
    cfg["_set"] = overridden
    return cfg


_ENV_VARIABLE = re.compile(r"\$(\{[A-Za-z_]\w*\}|[A-Za-z_]\w*)")


def key_source(cfg: dict[str, Any], dotted: str) -> str:
    """Where key ``dotted`` (e.g. ``output.root``) got its value: ``--set 'output.root=...'`` or the file."""
    overridden = cfg.get("_set", {})
    return f"--set {overridden[dotted]!r}" if dotted in overridden else f"config {cfg.get('_source', '?')}"


def spark_properties(cfg: dict[str, Any]) -> dict[str, str]:
    """The ``[spark]`` table as full Spark property names (``spark.`` prefix added) and string values."""
    props = {}
    for name, value in cfg["spark"].items():
        props[f"spark.{name}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return props
