"""List functions longer than a limit (default 60 lines), for the house rule "short functions".

    python scripts/check_function_length.py [--limit 60] [paths...]   (default: pipeline/)

Exits 1 when any function is over the limit, so it can run in CI or a pre-commit hook.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def long_functions(path: Path, limit: int) -> list[tuple[str, int, str, int]]:
    """(file, line, qualified name, length) of every function in ``path`` longer than ``limit`` lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = (child.end_lineno or child.lineno) - child.lineno + 1
                    if length > limit:
                        found.append((str(path), child.lineno, name, length))
                visit(child, name + ".")

    visit(tree, "")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("pipeline")])
    args = parser.parse_args(argv)
    files = [f for p in args.paths for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p])]
    found = [hit for f in files for hit in long_functions(f, args.limit)]
    for file, line, name, length in found:
        print(f"{file}:{line}: {name} is {length} lines (limit {args.limit})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
