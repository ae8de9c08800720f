"""Sandboxed HumanEval checks per second.

Runs all 164 canonical HumanEval solutions (program + tests) through r1lab's sandbox pool and
prints checks/s for each worker count. Every check must pass, or the number is meaningless.

    python benchmarks/sandbox_throughput.py [--workers 2 4 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from r1lab.sandbox import SandboxPool, check_sandbox
from r1lab.tasks import load_task


def measure(programs: list[str], workers: int, rounds: int) -> list[float]:
    """checks/s of each round (the pool's threads are started before timing)."""
    rates = []
    with SandboxPool(workers=workers, timeout_s=10.0) as pool:
        pool.map(programs[:workers])  # warm-up: threads, page cache
        for _ in range(rounds):
            start = time.perf_counter()
            results = pool.map(programs)
            elapsed = time.perf_counter() - start
            failed = [i for i, r in enumerate(results) if not r.passed]
            if failed:
                raise SystemExit(f"{len(failed)} canonical solutions failed, e.g. #{failed[0]}: "
                                 f"{results[failed[0]].stderr[-500:]}")
            rates.append(len(programs) / elapsed)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    check_sandbox()
    task = load_task("humaneval", "test")
    programs = [f"{p.meta['canonical_solution']}\n\n{p.tests}\n" for p in task]
    print(f"{len(programs)} HumanEval checks, {os.cpu_count()} CPU cores, "
          f"{platform.python_implementation()} {platform.python_version()}, bwrap sandbox")
    for workers in args.workers:
        rates = measure(programs, workers, args.rounds)
        print(f"workers={workers:2d}: {statistics.median(rates):6.1f} checks/s "
              f"(median of {args.rounds}; min {min(rates):.1f}, max {max(rates):.1f})")


if __name__ == "__main__":
    main()
