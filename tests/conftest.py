"""Shared test setup.

The model zoo (tiny timm and transformers models built from configs, with example inputs; no download) lives in
:mod:`zoo` beside this file, and every test imports it the same way::

    from zoo import HF_MODELS, MODELS, TIMM_MODELS, run

This file puts the test folder on ``sys.path`` before any test module is imported, so that also holds in the
processes that DDP tests spawn (they inherit ``sys.path``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The zoo's models are tiny: one thread per process is faster than two, and on a busy 2-core machine much faster
# (two OpenMP threads competing with other work turn a 10 µs matmul into milliseconds). Subprocesses the tests start
# (CLI runs, DDP workers) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment, so OpenMP reads it)

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def spawned_folder(tmp_path_factory):
    """One folder for every multi-process scenario of the session and the one-process references beside them."""
    return tmp_path_factory.mktemp("spawned")


@pytest.fixture(scope="session")
def two_process_runs(spawned_folder):
    """``spawned_folder`` once every two-process scenario of the suite wrote its results (``spawned_runs.py``)."""
    from spawned_runs import run_two

    return run_two(spawned_folder)


@pytest.fixture(scope="session")
def four_process_runs(two_process_runs):
    """``spawned_folder`` once every four-process scenario wrote its results too (some read two-process ones)."""
    from spawned_runs import run_four

    return run_four(two_process_runs)
