"""Write docs/configuration.md from the config SCHEMA (the one source of truth).

    .venv/bin/python scripts/gen_config_docs.py           # rewrite the file
    .venv/bin/python scripts/gen_config_docs.py --check   # exit 1 when it is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mf_spark.config import SCHEMA, Key, MapOf  # noqa: E402

TARGET = REPO / "docs" / "configuration.md"
HEADER = """# Configuration reference

Generated from `mf_spark/config.py` by `scripts/gen_config_docs.py`; do not edit by hand.

A job reads one TOML file (`--config conf/local.toml`) and any number of `--set section.key=value`
overrides (the value is parsed as TOML: `--set train.rank=64`, `--set evaluate.ks=[10,20]`,
`--set spark.sql.shuffle.partitions=8`). An unknown key, a wrong type, a value outside its choices or
range, or a missing required key stops the job before Spark starts, with exit code 2 and a message naming
the key and the file (or the `--set` that set it). So do an empty string where the default is not empty
(a column name, a metric), an integer outside the 64-bit range, NaN or infinity, and a `[spark]` key
written with its `spark.` prefix (Spark would ignore `spark.spark.sql...`). Relative paths (`input.path`,
`output.root`, filter tables) are resolved against the directory the job starts in, and a leading `~` is
the home directory. Environment variables (`$HOME`, `${DATA}`) are not expanded in the file, and a local
path written there holding one is refused (exit 2) rather than taken as a directory named `$HOME`: let the
shell expand it in an override, `--set "output.root=$DATA/mf-spark"` (a `--set` value and a URL, where `$`
is a legal character, are taken as they are).
"""


def _default(key: Key) -> str:
    if key.required:
        return "**required**"
    value = key.default
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _rows(table: dict, prefix: str) -> list[str]:
    rows: list[str] = []
    for name, spec in table.items():
        full = f"{prefix}{name}"
        if isinstance(spec, Key):
            extra = f" One of: {', '.join(spec.choices)}." if spec.choices else ""
            if spec.minimum is not None:
                extra += f" Above {spec.minimum:g}." if spec.above_minimum else f" Minimum {spec.minimum:g}."
            if spec.maximum is not None:
                extra += f" Maximum {spec.maximum:g}."
            rows.append(f"| `{full}` | {spec.type} | {_default(spec)} | {spec.doc}.{extra} |")
        elif isinstance(spec, MapOf):
            if isinstance(spec.value, dict):
                # The default set itself matters (any other name is rejected): show it inline.
                default = "; ".join(
                    f"{sub}: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
                    for sub, fields in spec.default.items()
                )
                shown = f"`{default}`" if default else ""
                rows.append(f"| `{full}.<name>` | table | {shown} | {spec.doc}; each has: |")
                rows += _rows(spec.value, f"{full}.<name>.")
            else:
                rows.append(f"| `{full}.<name>` | {spec.value} | | {spec.doc} |")
        else:
            rows += _rows(spec, f"{full}.")
    return rows


def render() -> str:
    parts = [HEADER]
    for section, table in SCHEMA.items():
        parts.append(f"\n## [{section}]\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|")
        if isinstance(table, MapOf):
            parts.append(f"| `{section}.<name>` | {table.value} | | {table.doc} |")
        else:
            parts += _rows(table, f"{section}.")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    # argparse so that --help (or a typo) explains itself instead of silently rewriting the file
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 without writing when docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
