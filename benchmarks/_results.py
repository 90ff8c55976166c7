"""What the host-time benchmarks share: timing one call many times, and writing the rows."""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch


def host_times(fn, calls: int) -> dict:
    """``fn()`` timed ``calls`` times with the garbage collector off (a collection inside a
    timed call is not the call's cost): ``host_us``, the 10th percentile (the steadiest summary
    on a shared 2-core machine), and ``median_us``."""
    times = []
    gc.disable()
    try:
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    times.sort()
    return {"host_us": times[len(times) // 10] * 1e6, "median_us": times[len(times) // 2] * 1e6}


def write_results(path: Path, benchmark: str, note: str, rows: list[dict]) -> None:
    """The rows with the machine and the date, written atomically to ``path``, when asked for
    (``D2V_BENCH_WRITE=1``) and there are rows."""
    if os.environ.get("D2V_BENCH_WRITE", "0") != "1" or not rows:
        return
    doc = {"benchmark": benchmark, "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "note": note, "results": rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
