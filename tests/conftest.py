"""Shared test settings. Keep each concern in its own clearly marked section."""
from __future__ import annotations

import os

import pytest
import torch

# ==================================================================================================
# Operator-correctness suite (test_variant_identity, test_equivalence, test_gradcheck, test_grid,
# test_flops_params): CPU threads per test process.
#
# The tests run many small kernels. With pytest-xdist every worker is a process, and each would
# start as many intra-op threads as the machine has cores: 2 workers x 2 threads on 2 cores
# oversubscribes the cores, and OpenMP threads that spin-wait for a descheduled partner slow small
# ops down by 10-100x. So each worker gets an equal share of the cores (at least one thread).
# ==================================================================================================
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


# ==================================================================================================
# The device: every test not marked gpu tests the CPU, on any machine. Training's default device is
# "auto" (a GPU where there is one), which on a GPU machine would run the CPU tests under bf16
# autocast on the GPU, where their exact comparisons (a resumed run against an uninterrupted one,
# compiled against eager) do not hold. ABLATE_DEVICE pins what "auto" means, for this process and
# every command a test starts; the gpu tests name cuda themselves.
# ==================================================================================================
os.environ["ABLATE_DEVICE"] = "cpu"


# ==================================================================================================
# GPU comparisons in float32 (tests marked gpu): cuDNN convolutions run in TF32 (a 10-bit mantissa) by
# default, which alone moves a micro model's logits by ~1e-3 relative; a float32 check must not
# measure that. Training on a GPU uses bf16 autocast, so TF32 never decides a result there.
# ==================================================================================================
@pytest.fixture
def true_float32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
