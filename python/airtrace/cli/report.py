"""``airtrace report``: the HTML report of a scores file written by ``airtrace score --output``; imports
``airtrace.report`` and ``airtrace.cli.args``."""

from __future__ import annotations

import argparse

from airtrace.cli.args import check_output, positive_int


def _cmd_report(args: argparse.Namespace) -> int:
    from airtrace.report import load_document, write_report

    check_output(args.out, "--out")
    document = load_document(args.scores)
    path = write_report(args.out, document, title=args.title, max_plots=args.max_plots)
    if not args.quiet:
        print(f"report: {path.resolve()}")
    return 0


def add_parser(sub) -> None:
    """Register ``airtrace report``."""
    p = sub.add_parser("report", help="HTML report of a scores file (airtrace score --output): per query the most "
                                      "helpful and harmful training examples, score distribution, per-token shading")
    p.add_argument("scores", metavar="SCORES", help="file written by airtrace score --output (JSON, CSV or Parquet; "
                                                    "JSON carries texts, settings and the score distribution)")
    p.add_argument("--out", default="report.html", metavar="HTML", help="the report (default report.html)")
    p.add_argument("--title", default="airtrace report", help="page title")
    p.add_argument("--max-plots", type=positive_int, default=200,
                   help="queries that get a distribution plot (default 200)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=_cmd_report, parser=p)
