"""Damping sweep of ``ours`` on TOFU: the forgotten- and retained-row NLL gaps to the gold per damping and size.

The curvature cache is built once per tenant size and shared by every damping (it does not depend on the
damping), so a sweep costs one cache build per size plus one cheap solve and one evaluation per point.
This is how the defaults of ``benchmarks.tofu`` were chosen (benchmarks/README.md)::

    python -m benchmarks.tofu_sweep --sizes 20,40,80,116 --dampings 0.003,0.0045,0.00625,0.009,0.0125,0.018,0.025
    python -m benchmarks.tofu_sweep --sizes 80,116 --requests remove:forget10 --rule   # the default rule
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from benchmarks.provenance import json_safe
from benchmarks.tofu import REPO, Options, Runner

logger = logging.getLogger("benchmarks.tofu_sweep")


def gap(row: dict, metric: str) -> float:
    """Signed relative gap of a method's metric to the gold's (-0.05: 5% below the gold's)."""
    return (row["metrics"][metric] - row["gold"][metric]) / row["gold"][metric]


def sweep(sizes: list[int], requests: list[str], dampings: list[float], base: Options) -> list[dict]:
    from benchmarks.tofu_data import RequestSpec

    runner = Runner(dataclasses.replace(base, methods=("ours",), scaling=()), ["sweep"])
    runner.setup()
    points = []
    for authors in sizes:
        size = runner.tenant(authors)
        for name in requests:
            request = runner.prepare_request(size, RequestSpec.parse(name))
            for damping in dampings:
                runner.options = dataclasses.replace(base, damping=damping)
                row = runner.run_method("ours", size, request)
                point = {"authors": authors, "records": size["records"], "request": name,
                         "damping": damping, "effective_damping": row["info"]["config"]["damping"],
                         "forget_quality": row["metrics"]["forget_quality"],
                         "nll_forget_gap": gap(row, "nll_forget"), "nll_retained_gap": gap(row, "nll_retained"),
                         "kl_retained": row["metrics"]["kl_retained"], "row": row}
                logger.info("%4d records %-24s damping %.4g: forget gap %+.1f%%, retained gap %+.2f%%, fq %.3g",
                            size["records"], name, damping, 100 * point["nll_forget_gap"],
                            100 * point["nll_retained_gap"], point["forget_quality"])
                points.append(point)
    return points


def table(points: list[dict]) -> str:
    lines = ["| records | request | damping | effective rel. damping | FQ | NLL forget vs gold | NLL retained vs gold |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['records']} | {p['request']} | {p['damping']:g} | {p['effective_damping']:.4g} | "
                     f"{p['forget_quality']:.3g} | {100 * gap(p['row'], 'nll_forget'):+.1f}% | "
                     f"{100 * gap(p['row'], 'nll_retained'):+.2f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tofu_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="40", help="tenant sizes in authors, comma-separated (default 40)")
    parser.add_argument("--requests", default="remove:forget01", help="requests, comma-separated (default remove:forget01)")
    parser.add_argument("--dampings", default="0.00625,0.0125,0.025", help="relative dampings, comma-separated")
    parser.add_argument("--rule", action="store_true",
                        help="evaluate benchmarks.tofu's damping rule (damping grows with the edited fraction) "
                        "instead of the constant --dampings")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tofu-sweep"))
    parser.add_argument("--render", metavar="SWEEP_JSON", nargs="+", help="print the table of earlier sweeps and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(table([p for path in args.render for p in json.loads(Path(path).read_text())["points"]]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    base = Options() if args.rule else dataclasses.replace(Options(), damping_fraction_exponent=0.0)
    dampings = [base.damping] if args.rule else [float(d) for d in args.dampings.split(",")]
    points = sweep([int(s) for s in args.sizes.split(",")], args.requests.split(","), dampings, base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    document = {"command": " ".join(["python -m benchmarks.tofu_sweep", *(argv or sys.argv[1:])]),
                "options": dataclasses.asdict(base), "points": points}
    (out / "sweep.json").write_text(json.dumps(json_safe(document), indent=1))
    (out / "sweep.md").write_text(table(points) + "\n")
    print(table(points))
    return 0


if __name__ == "__main__":
    sys.exit(main())
