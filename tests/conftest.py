"""Test-wide settings.

Tiny models run fastest on one thread: on a shared 2-core machine several OpenMP threads per process
spin against each other (a tiny decode step: 2.5 ms vs 55 ms).

Two lengths of run: ``./sinkserve.sh test`` (what CI runs, about 7 minutes on 2 cores) skips the tests
marked ``slow`` (the embedded model through real clients, the passkey, the README's first curl);
``./sinkserve.sh test --full`` runs everything, including the heavy runs gated by environment variables
(the 20k-token Responses chain, the embedded-model cluster failover): about 20 minutes.
"""

import os

import pytest
import torch

torch.set_num_threads(1)

HEAVY = ("SINKSERVE_HEAVY_TESTS", "SINKSERVE_CLUSTER_EMBEDDED")


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the slow and heavy tests (embedded model)")


def pytest_configure(config):
    if config.getoption("--full"):
        for name in HEAVY:
            os.environ.setdefault(name, "1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="slow: run ./sinkserve.sh test --full")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
