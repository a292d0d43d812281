"""`python -m bench run <scenario> [--targets …] [--quick]`: run a scenario against pgpush and its peers."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from bench import targets as targets_mod
from bench.database import BenchPostgres
from bench.harness import FULL, PER_SIZE_RESTART, QUICK, SCENARIOS, SMOKE, Result, Sizes
from bench.report import table, write_results_md
from bench.system import machine, pin_self, raise_fd_limit


class ExistingPostgres(BenchPostgres):
    """A database someone else made and migrated (the test suite's), used as it is."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def start(self) -> str:
        return self.url

    def stop(self) -> None:
        pass


async def run(
    scenario: str, names: list[str], sizes: Sizes, *, database_url: str | None = None, pin: bool = True
) -> list[Result]:
    """Run one scenario against each target in turn (same Postgres, tables emptied between targets)."""
    raise_fd_limit()
    if pin:
        pin_self()
    root = Path(tempfile.mkdtemp(prefix="pgpush-bench-"))
    pg = ExistingPostgres(database_url) if database_url else BenchPostgres(root)
    await pg.start()
    results: list[Result] = []
    try:
        stepped = PER_SIZE_RESTART.get(scenario)
        runs = [sizes]
        if stepped:
            runs = [dataclasses.replace(sizes, **{stepped: (n,)}) for n in getattr(sizes, stepped)]
        for step_sizes in runs:
            for name in names:
                await pg.reset()
                print(f"[bench] {scenario}: {name} …", file=sys.stderr, flush=True)
                target = await targets_mod.start(name, pg.url, pin=pin)
                try:
                    results += await SCENARIOS[scenario](pg, target, step_sizes, pin=pin)
                finally:
                    target.stop()
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run one scenario (or 'all') and update bench/RESULTS.md")
    run_parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    run_parser.add_argument("--targets", default=",".join(targets_mod.ALL_TARGETS))
    run_parser.add_argument("--quick", action="store_true", help="fewer sizes and shorter steps")
    run_parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's run)")
    run_parser.add_argument("--database-url", help="use this migrated database instead of a fresh cluster")
    run_parser.add_argument("--no-pin", action="store_true", help="do not pin server and client to cores")
    run_parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(names) - set(targets_mod.ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(targets_mod.ALL_TARGETS)}")
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    sections = {}
    for scenario in scenarios:
        started = time.strftime("%Y-%m-%d %H:%M")
        results = uvloop.run(run(scenario, names, sizes, database_url=args.database_url, pin=not args.no_pin))
        text = table(results, names)
        print(f"\n## {scenario}\n\n{text}\n", flush=True)
        sections[scenario] = f"Run {started}: `{command}`\n\n{text}\n"
    if not args.no_write:
        write_results_md(sections, machine(), targets_mod.ALL_TARGETS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
