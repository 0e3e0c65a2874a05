"""Every multi-process scenario of the suite, run once per test session: one start of two processes and one of
four (each start imports torch, Lightning and transformers in every process, the bulk of a scenario's cost).

The test modules read what the scenarios wrote through the session fixtures ``two_process_runs`` and
``four_process_runs`` (``conftest.py``); scenarios of several modules share one folder, each under its own name.
Scenarios run in the order listed (a resume after the fit that wrote its checkpoint). What must happen in the test
process runs before (saving a base to load) or after the processes (one-process resumes of their checkpoints).
"""

from __future__ import annotations

from pathlib import Path

import check_jobs
import fsdp2_jobs
import reshard_jobs
import tp_jobs
from fsdp2_jobs import spawn

REGISTRIES = (
    fsdp2_jobs,
    tp_jobs,
    reshard_jobs,
    check_jobs,
)  # each lists its scenarios by number of processes in SPAWNED
TWO_PROCESSES = [f"{m.__name__}:{name}" for m in REGISTRIES for name in m.SPAWNED.get(2, [])]
FOUR_PROCESSES = [f"{m.__name__}:{name}" for m in REGISTRIES for name in m.SPAWNED.get(4, [])]


def run_two(out: Path) -> Path:
    reshard_jobs.save_base(str(out))
    for base in reshard_jobs.BASES:
        reshard_jobs.uninterrupted(base, str(out))
    spawn(TWO_PROCESSES, str(out), world_size=2)
    for base in reshard_jobs.BASES:
        reshard_jobs.resume(base, "fsdp2", "single", str(out), 1)
    return out


def run_four(out: Path) -> Path:
    spawn(FOUR_PROCESSES, str(out), world_size=4)
    return out
