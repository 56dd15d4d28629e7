"""The longest functions under a folder, by source lines (an ast walk; nothing is imported).

python benchmarks/longest_functions.py src --most 10
"""

import argparse
import ast
from pathlib import Path


def longest(root: Path, most: int) -> list[tuple[int, str]]:
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}::{node.name}"))
    return sorted(rows, key=lambda r: (-r[0], r[1]))[:most]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--most", type=int, default=10)
    args = parser.parse_args()
    for lines, name in longest(args.root, args.most):
        print(f"{lines:4d}  {name}")
