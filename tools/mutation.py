"""Mutation testing of the modules where a silent bug costs most, each against its own tests (docs/testing.md).

For every module in pyproject's [tool.cognate.mutation] table (or the ones named on the command line) this makes
a scratch copy of the project, tells mutmut (>= 3.8) to mutate that module only and to run only the module's own
test files, runs it with OMP_NUM_THREADS=1 at low priority, and prints the score table:

    pip install mutmut
    python tools/mutation.py                            # every module in the table
    python tools/mutation.py src/cognate/optim/muon.py  # one
    python tools/mutation.py --survivors ...            # also print each surviving mutant's diff
    python tools/mutation.py --again ...                # after new tests: run the last run's survivors again

The score is (killed + timeout) / all mutants: a mutant that no selected test runs ("no tests") counts as a
survivor, a timeout as killed (as mutmut counts it). Equivalent survivors are judged by hand and listed in
docs/testing.md.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import shutil
import subprocess
import sys
import tokenize
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS_BY_EXIT_CODE = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped"}
STATUS_BY_EXIT_CODE.update({24: "timeout", 36: "timeout", 152: "timeout", 255: "timeout", -24: "timeout"})


def modules_table() -> dict[str, dict[str, list[str]]]:
    """Module -> {"tests": its test files, "functions": the part of it to mutate (absent: all of it), "keyword":
    pytest's -k expression selecting among the tests (absent: all)}.

    A module's entry is its list of test files, or a table with `tests`, `functions` (top-level functions and
    classes by name, methods as "Class.method") where only a path through the module is in scope, and `keyword`."""
    import tomllib  # Python 3.11+, like mutmut 3's own configuration reader

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table = pyproject["tool"]["cognate"]["mutation"]
    return {module: entry if isinstance(entry, dict) else {"tests": entry} for module, entry in table.items()}


def undecorate_no_grad(source: str) -> str:
    """`@torch.no_grad()` on a def rewritten as `f = torch.no_grad()(f)` after it: the same function, but one that
    mutmut (which skips decorated functions) mutates."""
    lines = source.splitlines(keepends=True)
    functions = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and [ast.unparse(d) for d in node.decorator_list] == ["torch.no_grad()"]
    ]
    for node in sorted(functions, key=lambda n: n.lineno, reverse=True):
        indent = " " * node.col_offset
        lines.insert(node.end_lineno, f"{indent}{node.name} = torch.no_grad()({node.name})\n")
        del lines[node.decorator_list[0].lineno - 1]
    return "".join(lines)


def header_lines(source: str) -> dict[int, int]:
    """For every def and class statement: the line it starts on -> the line of the colon that ends its header."""
    ends, depth, opened = {}, 0, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.string in ("def", "class") and opened is None and depth == 0:
            opened = token.start[0]
        elif token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
        elif token.type == tokenize.OP and token.string == ":" and depth == 0 and opened is not None:
            ends[opened], opened = token.start[0], None
    return ends


def scope_to_functions(source: str, functions: list[str]) -> str:
    """`source` with every top-level function, class and method outside `functions` marked `# pragma: no mutate
    block` (mutmut then neither mutates nor wraps it): mutation testing of one path through a module."""
    tree, ends = ast.parse(source), header_lines(source)
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    excluded = []
    for node in tree.body:
        if not isinstance(node, definitions) or node.name in functions:
            continue
        methods = {f.removeprefix(f"{node.name}.") for f in functions if f.startswith(f"{node.name}.")}
        if isinstance(node, ast.ClassDef) and methods:
            excluded += [m for m in node.body if isinstance(m, definitions) and m.name not in methods]
        else:
            excluded.append(node)
    found = {n.name for n in tree.body if isinstance(n, definitions)} | {
        f"{n.name}.{m.name}"
        for n in tree.body
        if isinstance(n, ast.ClassDef)
        for m in n.body
        if isinstance(m, definitions)
    }
    if missing := sorted(set(functions) - found):
        raise SystemExit(
            f"error: [tool.cognate.mutation] names functions the module does not have: {missing}"
        )
    lines = source.splitlines(keepends=True)
    for node in excluded:
        line = ends[node.lineno] - 1  # ast's lineno is the def/class keyword's, after any decorators
        lines[line] = lines[line].rstrip("\n") + "  # pragma: no mutate block\n"
    return "".join(lines)


def prepare_scratch(
    module: str,
    tests: list[str],
    scratch: Path,
    functions: list[str] | None = None,
    keyword: str | None = None,
) -> None:
    """A copy of src/, tests/ and pyproject.toml with a setup.cfg that scopes mutmut to `module` (or to its
    `functions`) and `tests` (or those of them that pytest's `-k keyword` selects)."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for folder in ("src", "tests"):
        shutil.copytree(ROOT / folder, scratch / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", scratch / "pyproject.toml")
    source = undecorate_no_grad((ROOT / module).read_text())
    (scratch / module).write_text(scope_to_functions(source, functions) if functions else source)
    lines = [
        "[mutmut]",
        "source_paths = src",
        f"only_mutate = {module}",
        "pytest_add_cli_args_test_selection =",
        *(f"    {test}" for test in tests),
        *(["    -k", f"    {keyword}"] if keyword else []),
        "pytest_add_cli_args =",
        "    -p",
        "    no:cacheprovider",
        "    -q",
    ]
    (scratch / "setup.cfg").write_text("\n".join(lines) + "\n")


def refresh_tests(scratch: Path) -> None:
    """The current tests/ into a scratch folder of an earlier run (and its mutants/ copy, which mutmut runs)."""
    for folder in (scratch / "tests", scratch / "mutants" / "tests"):
        shutil.copytree(
            ROOT / "tests", folder, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
        )


def run_mutmut(scratch: Path, max_children: int, mutants: list[str] = ()) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # Subprocesses the tests start (the CLI, torchrun) import the mutated copy too.
        "PYTHONPATH": str(scratch / "mutants" / "src"),
        # The built-in curriculum the trainer tests use, prepared once instead of in every mutant's session (no
        # module in the table prepares data, so no mutant changes it).
        "COGNATE_TEST_BUILTIN_DATA": str(scratch / "builtin_data"),
    }
    # The folder must exist before Python starts, or the import system caches it as absent and the tests import
    # the unmutated package (an editable install) instead.
    (scratch / "mutants" / "src").mkdir(parents=True, exist_ok=True)
    command = ["nice", "-n", "15", sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)]
    command += mutants  # named mutants are run again even when they have a result
    subprocess.run(command, cwd=scratch, env=env, check=True)


def results(scratch: Path) -> dict[str, str]:
    """Each mutant's status, read from mutmut's .meta files."""
    statuses = {}
    for meta in (scratch / "mutants").rglob("*.meta"):
        for name, exit_code in json.loads(meta.read_text())["exit_code_by_key"].items():
            statuses[name] = (
                "not checked" if exit_code is None else STATUS_BY_EXIT_CODE.get(exit_code, "other")
            )
    return statuses


def survivor_diffs(scratch: Path, names: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(scratch / "mutants" / "src")}
    return "".join(
        subprocess.run(
            [sys.executable, "-m", "mutmut", "show", name],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
        for name in names
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: all in the table)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/cognate-mutation"))
    parser.add_argument("--max-children", type=int, default=1)
    parser.add_argument("--survivors", action="store_true", help="print the diff of every surviving mutant")
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument(
        "--again",
        action="store_true",
        help="keep the scratch folder of the last run, take the current tests, and run only its survivors again",
    )
    args = parser.parse_args(argv)
    table = modules_table()
    unknown = [m for m in args.modules if m not in table]
    if unknown:
        print(f"error: {unknown} not in [tool.cognate.mutation]; known: {sorted(table)}", file=sys.stderr)
        return 2
    rows = {}
    for module in args.modules or list(table):
        scratch = args.scratch / module.replace("/", "_").removesuffix(".py")
        entry = table[module]
        if args.again and scratch.exists():
            refresh_tests(scratch)
            again = sorted(n for n, s in results(scratch).items() if s in ("survived", "no tests"))
            if again:
                run_mutmut(scratch, args.max_children, again)
        else:
            prepare_scratch(module, entry["tests"], scratch, entry.get("functions"), entry.get("keyword"))
            run_mutmut(scratch, args.max_children)
        statuses = results(scratch)
        counts = Counter(statuses.values())
        total = sum(counts.values())
        rows[module] = {**counts, "score": (counts["killed"] + counts["timeout"]) / total if total else None}
        if args.survivors:
            print(survivor_diffs(scratch, sorted(n for n, s in statuses.items() if s == "survived")))
    print("\n| module | mutants | killed | survived | no tests | timeout | score |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for module, row in rows.items():
        total = sum(v for k, v in row.items() if k != "score")
        score = "-" if row["score"] is None else f"{100 * row['score']:.0f}%"
        print(
            f"| {module} | {total} | {row.get('killed', 0)} | {row.get('survived', 0)} | "
            f"{row.get('no tests', 0)} | {row.get('timeout', 0)} | {score} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
