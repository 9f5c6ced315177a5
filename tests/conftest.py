import os

import pytest
import torch

# Kernels run in the Triton interpreter where there is no GPU; this must be set before triton
# decorates any kernel, i.e. before dist_reattn.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_grad_enabled(False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
