"""Run the benches: `python -m bench [--quick] [--only ingest,relay,...]`."""

from __future__ import annotations

import argparse
import importlib
import time

from bench.common import Report


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", default="", help="comma-separated sections: ingest,memory,relay,audit")
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}
    report = Report()
    started = time.perf_counter()

    from bench import ingest

    def want(name: str) -> bool:
        return not only or name in only

    if want("ingest"):
        report.console.print("[bold]ingest[/bold]")
        ingest.bulk(report, 10_000 if args.quick else 100_000)
        ingest.transactional(report, 500 if args.quick else 3_000)
    if want("memory"):
        report.console.print("[bold]memory[/bold]")
        ingest.memory(report, 50_000 if args.quick else 1_000_000)
    for name in ("relay", "audit"):
        if not want(name):
            continue
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError:
            continue
        report.console.print(f"[bold]{name}[/bold]")
        module.run(report, quick=args.quick)
    report.print()
    report.console.print(f"bench took {time.perf_counter() - started:,.0f} s")


if __name__ == "__main__":
    main()
