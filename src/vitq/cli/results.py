"""``vitq results``: the finished jobs of a results store as JSON lines, a markdown table or CSV, filtered and
grouped (mean ± std over seeds), and a plot of agreement against bits per method."""

from __future__ import annotations

from vitq.errors import VitqError


def add_command(sub) -> None:
    r = sub.add_parser("results", help="query a sweep's results store: filter, group (mean ± std over seeds), "
                                       "print json / markdown / csv, plot")
    r.add_argument("--store", required=True, metavar="DIR", help="results store folder written by vitq sweep")
    r.add_argument("--format", choices=("json", "markdown", "csv"), default="json",
                   help="json: one record per job (or group) per line (default)")
    r.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE[,VALUE...]",
                   help="keep rows whose column is one of the values, e.g. method=omse,minmax (repeatable)")
    r.add_argument("--group-by", default=None, metavar="COLS",
                   help="comma-separated columns to group on, with mean ± std of the metrics; 'setting' = every "
                        "config column but the seed (the draws of one setting)")
    r.add_argument("--plot", default=None, metavar="FILE.png", help="also plot agreement vs weight bits per method")
    r.set_defaults(func=cmd_results)


def parse_where(items: list[str], flag: str = "--where") -> dict:
    where = {}
    for item in items:
        col, sep, value = item.partition("=")
        if not sep or not col:
            raise VitqError(f"{flag} {item!r}: expected COLUMN=VALUE (e.g. method=omse or w_bits=4,6)")
        where[col.strip()] = value.split(",")
    return where


def cmd_results(args) -> int:
    from vitq.sweep.report import DEFAULT_GROUP, plot, render

    where = parse_where(args.where)
    group_by = None
    if args.group_by:
        group_by = DEFAULT_GROUP if args.group_by == "setting" else tuple(c.strip() for c in args.group_by.split(","))
    if args.plot:
        from vitq.cli.validate import output_file_for_plot

        output_file_for_plot(args.plot)
    print(render(args.store, args.format, where, group_by), end="")
    if args.plot:
        plot(args.store, args.plot, where)
        print(f"wrote {args.plot}")
    return 0
