"""Run the benches: `python -m bench [--quick] [--only http,import,per-event,relay] [--full]`.

Default sections: http, import, per-event, relay (about 5 minutes with BENCH_SECONDS=15). `--full`
adds memory (peak RSS on 1,000,000 events) and audit (queries on a 1,000,000-event log), several
minutes each. BENCH_QUICK=1 (or --quick) shrinks everything to a smoke run of about a minute.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
import traceback

from bench.common import Report, quick

DEFAULT = ("http", "import", "per-event", "relay")
EXTRA = ("memory", "audit")


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run (BENCH_QUICK=1)")
    parser.add_argument("--only", default="", help=f"comma-separated sections: {','.join(DEFAULT + EXTRA)}")
    parser.add_argument("--full", action="store_true", help="also the memory and audit sections (1M events each)")
    args = parser.parse_args()
    if args.quick:
        os.environ["BENCH_QUICK"] = "1"
    small = quick()
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(DEFAULT + EXTRA)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; one of {', '.join(DEFAULT + EXTRA)}")
    sections = only or [*DEFAULT, *(EXTRA if args.full else ())]
    report = Report()
    started = time.perf_counter()
    for name in sections:
        report.console.print(f"[bold]{name}[/bold]")
        section_started = time.perf_counter()
        try:
            if name == "http":
                from bench import http

                http.run(report, quick=small)
            elif name == "import":
                from bench import bulk

                bulk.run(report, 5_000 if small else 100_000)
            elif name == "per-event":
                from bench import peer

                peer.run(report, 300 if small else 1_500)
            elif name == "memory":
                from bench import ingest

                ingest.memory(report, 50_000 if small else 1_000_000)
            else:
                module = importlib.import_module(f"bench.{name}")
                module.run(report, quick=small)
        except Exception as exc:  # a section broken by work in progress must not hide the others' figures
            report.add(name, "FAILED", f"{type(exc).__name__}: {str(exc)[:120]}", "-", "-", "-", False)
            traceback.print_exc()
        report.console.print(f"  ({name}: {time.perf_counter() - section_started:,.0f} s)", highlight=False)
    report.print()
    report.console.print(f"bench took {time.perf_counter() - started:,.0f} s")


if __name__ == "__main__":
    main()
