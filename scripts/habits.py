"""Two habits of the models, counted (../STYLE.md's "real names, one statement per line"):

- the share of one-letter names among the local names functions bind (parameters, assignments, loop and
  `with`/`except` targets; comprehension variables and `_` are not counted: a one-letter name is fine there);
- assignments with three or more targets (`a, b, c = ...` or `a = b = c = ...`) per 1,000 lines;
- and the longest module, against --max-lines (a module past a few hundred lines holds two concerns).

    python3 scripts/habits.py [PATH ...] [--max-one-letter PERCENT] [--max-multi PER_1000_LINES] [--max-lines N]

Prints the figures and the worst files; exits 1 when a figure is over its maximum.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path


def _names(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Starred):
        return _names(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _names(element)]
    return []


def _arity(target: ast.AST) -> int:
    return len(target.elts) if isinstance(target, (ast.Tuple, ast.List)) else 1


class Locals(ast.NodeVisitor):
    """The local names each function binds, skipping nested comprehensions."""

    def __init__(self) -> None:
        self.bound: list[str] = []
        self.multi = 0

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        names: set[str] = set()
        arguments = node.args
        for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
            names.add(arg.arg)
        for arg in (arguments.vararg, arguments.kwarg):
            if arg is not None:
                names.add(arg.arg)
        for child in ast.walk(node):
            if child is not node and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Assign):
                for target in child.targets:
                    names.update(_names(target))
            elif isinstance(child, (ast.AnnAssign, ast.AugAssign)):
                names.update(_names(child.target))
            elif isinstance(child, (ast.For, ast.AsyncFor)):
                names.update(_names(child.target))
            elif isinstance(child, ast.withitem) and child.optional_vars is not None:
                names.update(_names(child.optional_vars))
            elif isinstance(child, ast.ExceptHandler) and child.name:
                names.add(child.name)
            elif isinstance(child, ast.NamedExpr):
                names.update(_names(child.target))
        names -= {"self", "cls", "_"}
        self.bound += sorted(names)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Assign(self, node: ast.Assign) -> None:
        if len(node.targets) >= 3 or any(_arity(target) >= 3 for target in node.targets):
            self.multi += 1
        self.generic_visit(node)


def measure(paths: list[Path]) -> tuple[int, int, int, int, Counter[str], Counter[str]]:
    bound = 0
    one_letter = 0
    multi = 0
    lines = 0
    worst: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for path in paths:
        source = path.read_text()
        visitor = Locals()
        visitor.visit(ast.parse(source))
        short = sum(1 for name in visitor.bound if len(name) == 1)
        bound += len(visitor.bound)
        one_letter += short
        multi += visitor.multi
        lines += source.count("\n")
        sizes[str(path)] = source.count("\n")
        if short or visitor.multi:
            worst[str(path)] = short + visitor.multi
    return bound, one_letter, multi, lines, worst, sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["gateway"])
    parser.add_argument("--max-one-letter", type=float, default=None, help="percent")
    parser.add_argument("--max-multi", type=float, default=None, help="per 1,000 lines")
    parser.add_argument("--max-lines", type=int, default=None, help="lines in one module")
    parser.add_argument("--worst", type=int, default=5)
    args = parser.parse_args()
    files = sorted(f for p in args.paths for f in ([Path(p)] if p.endswith(".py") else Path(p).rglob("*.py")))
    bound, one_letter, multi, lines, worst, sizes = measure(files)
    share = 100 * one_letter / max(bound, 1)
    per_1000 = 1000 * multi / max(lines, 1)
    print(f"one-letter locals: {one_letter} of {bound} ({share:.1f} %)")
    print(f"three-target assignments: {multi} in {lines} lines ({per_1000:.2f} per 1,000)")
    for path, count in worst.most_common(args.worst):
        print(f"  {count:3d}  {path}")
    longest, longest_lines = sizes.most_common(1)[0] if sizes else ("", 0)
    print(f"longest module: {longest} ({longest_lines} lines)")
    over = (
        (args.max_one_letter is not None and share > args.max_one_letter)
        or (args.max_multi is not None and per_1000 > args.max_multi)
        or (args.max_lines is not None and longest_lines > args.max_lines)
    )
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
