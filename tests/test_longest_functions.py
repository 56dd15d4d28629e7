"""benchmarks/longest_functions.py: functions ranked by their source lines, nested ones included."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.longest_functions import longest  # noqa: E402


def test_ranks_functions_by_lines(tmp_path):
    (tmp_path / "pkg").mkdir()
    a = "def short():\n    return 1\n\n\ndef long():\n    x = 1\n    y = 2\n    return x + y\n"
    (tmp_path / "pkg" / "a.py").write_text(a)
    b = "class C:\n    async def method(self):\n        def inner():\n            pass\n        return 0\n"
    (tmp_path / "b.py").write_text(b)
    assert longest(tmp_path, 10) == [
        (4, "b.py::method"),
        (4, "pkg/a.py::long"),
        (2, "b.py::inner"),
        (2, "pkg/a.py::short"),
    ]
    assert longest(tmp_path, 1) == [(4, "b.py::method")]
