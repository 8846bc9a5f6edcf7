"""Ingest only: raw events -> interactions and rejects for one date, plus the ID maps (standalone run).

    ./spark-submit.sh jobs/ingest.py --config conf/local.toml --date 2011-12-09

Writes Parquet ``<output.root>/ingest/dt=D/interactions`` and ``.../rejects`` and the JSON report
``.../report.json``, updates ``<output.root>/id_maps`` and prints the report table. The nightly does not
use this job: it calls the same library function, ``mf_spark.ingest.run_ingest``. Exit codes: 3 for bad
input (missing path or column, uncastable type, no events), 4 when too many rows are rejected.
"""

from __future__ import annotations

import datetime as dt
import os
import sys

from mf_spark.cli import parse_date, run_job


def add_arguments(parser):
    parser.add_argument("--date", type=parse_date, required=True, help="run date D: the window ends on D")


def body(spark, cfg, args):
    from mf_spark.ingest import IngestSettings, format_report_table, run_ingest, write_report

    root = cfg["output"]["root"]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    result = run_ingest(
        spark,
        input_path=cfg["input"]["path"],
        input_format=cfg["input"]["format"],
        columns=cfg["input"]["columns"],
        reader_options=cfg["input"]["options"],
        settings=IngestSettings.from_config(cfg["ingest"]),
        run_date=args.date,
        id_map_root=os.path.join(root, "id_maps"),
        run_id=f"ingest-{args.date.isoformat()}-{stamp}",
    )
    out = os.path.join(root, "ingest", f"dt={args.date.isoformat()}")
    result.interactions.orderBy("user_idx", "item_idx").write.mode("overwrite").parquet(
        os.path.join(out, "interactions")
    )
    result.rejects.write.mode("overwrite").parquet(os.path.join(out, "rejects"))
    write_report(result.report, os.path.join(out, "report.json"))
    result.unpersist()
    print(format_report_table(result.report))


if __name__ == "__main__":
    sys.exit(run_job("mf-spark-ingest", __doc__, body, add_arguments))
