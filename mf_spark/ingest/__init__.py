"""Ingest: raw click/view/purchase events -> a clean interaction table, stable ID maps, rejects.

Entry point: :func:`run_ingest`; rules in :class:`IngestSettings`; user documentation in docs/ingest.md.
"""

from __future__ import annotations

from mf_spark.ingest.id_maps import load_id_map, read_pointer
from mf_spark.ingest.report import format_report_table, write_report
from mf_spark.ingest.rules import REJECT_REASONS
from mf_spark.ingest.settings import EventTypeRule, IngestSettings
from mf_spark.ingest.stage import IngestResult, run_ingest

__all__ = [
    "REJECT_REASONS",
    "EventTypeRule",
    "IngestResult",
    "IngestSettings",
    "format_report_table",
    "load_id_map",
    "read_pointer",
    "run_ingest",
    "write_report",
]
