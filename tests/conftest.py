"""Test-wide settings: tiny models run fastest on one thread, and on a shared 2-core machine
several OpenMP threads per process spin against each other (a tiny decode step: 2.5 ms vs 55 ms)."""

import torch

torch.set_num_threads(1)
