"""Shared fixtures: the device every op test runs on, the embedded stories260K target and tiny
random targets of several families. Shared functions and constants live in helpers.py."""
import pytest
import torch
from helpers import TINY_FAMILIES, tiny_model

from falcon_ext import ops  # noqa: F401  (loads the library, so its CUDA kernels can be looked up)
from falcon_ext.targets import load_target

# The one rule for CUDA: tests marked `cuda` (by hand, or through the device fixture's "cuda"
# case) are collected everywhere, so `pytest -m cuda --collect-only` lists them on any machine,
# and skip unless a GPU is visible and this build of falcon_ext registered its CUDA kernels.
# A check that holds on every device takes the `device` fixture; a test is marked `cuda` by hand
# only for what the CPU has no counterpart of: the CUDA op against the CPU op (on the CPU that
# would compare the op with itself), kernel-side checks, streams, shared-memory limits.
HAS_CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("falcon_ext::tree_build",
                                                                                       "CUDA")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and the CUDA build of falcon_ext")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# Session scope: hypothesis tests take it too (it refuses function-scoped fixtures).
@pytest.fixture(scope="session", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Each test that takes it runs on the CPU and, marked `cuda`, on the GPU."""
    return request.param


# The test models are tiny: one thread is fastest, and it avoids OpenMP spin-waiting when
# other processes share the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def stories():
    return load_target("stories260K")


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def tiny(request):
    return tiny_model(request.param)
