"""``python -m benchmarks.speed``: the same as ``msflow speed``."""

import sys

from benchmarks.speed import main

sys.exit(main())
