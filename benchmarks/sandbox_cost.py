"""What the code sandbox costs per run, and whether every MBPP reference solution passes in it (docs/evaluation.md).

    PYTHONPATH=src python benchmarks/sandbox_cost.py [--mbpp ../shared/data/mbpp/mbpp.jsonl] [--runs 30]

For each setup this machine supports (with namespaces, and without them): the median wall time of `--runs` runs
of `run_untrusted("pass")` after one warm-up, next to a bare `python -I -S -c pass`; then, with `--mbpp`, every
reference solution through `check_mbpp_solution` on two threads: how many pass (and the task ids that fail) and
the wall time per problem.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

from cognate.eval import sandbox


def median_ms(run, runs: int) -> float:
    run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 1)


def mbpp_references(path: Path) -> dict:
    problems = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def check(problem) -> bool:
        code, tests, setup = problem["code"], problem["test_list"], problem["test_setup_code"]
        return sandbox.check_mbpp_solution(code, tests, setup).passed

    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        passed = list(pool.map(check, problems))
    return {
        "problems": len(problems),
        "passed": sum(passed),
        "failed_task_ids": [p["task_id"] for p, ok in zip(problems, passed) if not ok],
        "ms_per_problem": round(1e3 * (time.perf_counter() - start) / len(problems), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mbpp", type=Path, help="MBPP's mbpp.jsonl: also check every reference solution")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    bare = [sys.executable, "-I", "-S", "-c", "pass"]
    result = {"bare_python_ms": median_ms(lambda: subprocess.run(bare, check=True), args.runs)}
    setups = {"without_namespaces": "left out by the benchmark"}
    if sandbox.namespaces_unavailable_reason() is None:
        setups["with_namespaces"] = None
    for name, reason in setups.items():
        with mock.patch.object(sandbox, "namespaces_unavailable_reason", return_value=reason):
            namespaces = reason is None
            row = {
                "run_untrusted_ms": median_ms(
                    lambda namespaces=namespaces: sandbox.run_untrusted("pass", namespaces=namespaces),
                    args.runs,
                )
            }
            if args.mbpp:
                row["mbpp_references"] = mbpp_references(args.mbpp)
        result[name] = row
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
