"""Speed of msflow against the official code's way of running the same model, on one machine.

Run from a source checkout: ``msflow speed [--quick] ...`` or ``python -m benchmarks.speed ...``. This
harness is not part of the installed package; it times the product's own functions, at every thread
count of ``--threads`` (default: 1 and all cores), each phase in a fresh subprocess:

- ``settings``   what a run depends on (:class:`SpeedSettings`, one flag per field), ``--quick``, targets;
- ``machine``    the CPU's features, cores and load, the matmul ceiling, timing and memory helpers;
- ``training``   ours (extract once, train the flows from the cache) against the reference loop, and
                 EfficientNet-Lite0's flows on the plain and the default path;
- ``flow_paths`` the flows' training step on torch's default path and on msflow's (the Lite0 phase);
- ``inference``  every runtime of :data:`~benchmarks.speed.inference.RUNTIME_ROWS` beside the reference
                 path, their agreement with float32 torch, what ``--runtime auto`` would pick;
- ``aupro``      the vectorised AUPRO against the official 800-threshold loop;
- ``tables``, ``report``  the printed tables and the verdicts against the targets;
- ``run``        the phases, the JSON, the report;
- ``batch1``     batch-1 latency and batch-8 throughput of torch against the reference path only.

With ``--accuracy-runs`` (finished run pairs on real data, ``--stop plateau`` vs the official length),
:mod:`benchmarks.time_to_accuracy` turns each thread count's per-image costs into the time to a model
of unchanged accuracy. Timings on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import sys

from benchmarks.speed.settings import SpeedSettings, build_parser, settings_from_args
from msflow.errors import MSFlowError

__all__ = ["SpeedSettings", "main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; errors the user can fix are one line, as in the ``msflow`` command."""
    from benchmarks.speed.run import run_bench

    args = build_parser(__doc__.split("\n", 1)[0]).parse_args(argv)
    try:
        run_bench(settings_from_args(args))
    except MSFlowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
