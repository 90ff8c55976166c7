"""Fault injection for the reliability tests, read from the environment once per run. They
do nothing unless their variable is set."""
from __future__ import annotations

import os


def crash_at_step() -> int | None:
    """D2V_FAST_CRASH_AT_STEP=N makes the first process to reach step N die (as a lost node
    would); its restart carries on."""
    raw = os.environ.get("D2V_FAST_CRASH_AT_STEP")
    return int(raw) if raw else None


def inject_nan_attempts() -> set[int]:
    """D2V_FAST_INJECT_NAN=3,4 makes update attempts 3 and 4 produce a NaN loss."""
    raw = os.environ.get("D2V_FAST_INJECT_NAN", "")
    return {int(x) for x in raw.split(",") if x.strip()}
