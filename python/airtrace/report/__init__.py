"""Reports a person can read: the scores document (``airtrace score --output``) and its HTML page (``airtrace
report``); re-exports the names of its modules, which import ``airtrace.scoring``.

Example::

    from airtrace.report import load_document, write_report

    write_report("report.html", load_document("scores.json"))
"""

from airtrace.report.document import (
    FORMATS,
    encode,
    load_document,
    output_format,
    rows_by_query,
    scores_document,
)
from airtrace.report.html import render, write_report
from airtrace.report.plot import distribution_png

__all__ = [
    "FORMATS",
    "distribution_png",
    "encode",
    "load_document",
    "output_format",
    "render",
    "rows_by_query",
    "scores_document",
    "write_report",
]
