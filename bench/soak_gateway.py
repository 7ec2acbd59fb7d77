"""The gateway as `tokenhub-gateway serve` runs it, under tracemalloc, for bench/soak.py --tracemalloc:
each SIGUSR2 writes a snapshot of the live allocations (after a full collection) to DIR/snapshot-N.pickle,
then DIR/snapshot-N.done, so the soak can diff two moments of one long run. Nothing of this is in the gateway.

    PYTHONPATH=CHECKOUT python bench/soak_gateway.py --config FILE --snapshots DIR [--frames 12]
"""

from __future__ import annotations

import argparse
import gc
import signal
import tracemalloc
from pathlib import Path
from types import FrameType


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--snapshots", required=True)
    parser.add_argument("--frames", type=int, default=12)
    args = parser.parse_args()
    tracemalloc.start(args.frames)
    out = Path(args.snapshots)
    out.mkdir(parents=True, exist_ok=True)
    taken = 0

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            )
        )
        snapshot.dump(str(out / f"snapshot-{taken}.pickle"))
        (out / f"snapshot-{taken}.done").write_text(str(tracemalloc.get_traced_memory()))

    signal.signal(signal.SIGUSR2, dump)

    from gateway.config import load_settings
    from gateway.serve import serve_settings

    serve_settings(load_settings(args.config))


if __name__ == "__main__":
    main()
