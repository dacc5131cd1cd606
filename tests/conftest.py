"""Shared test settings."""

import torch

# One intra-op thread: the tests' tensors are small, and OpenMP's spinning threads slow to a crawl when the two cores
# are shared with anything else (a benchmark, the suite's own subprocesses).
torch.set_num_threads(1)
