import os
import tempfile

import pytest
import torch

# Before any notebook kernel starts (nbval, papermill): quick budgets, and figures away from figures/.
os.environ.setdefault("LAB_BUDGET", "smoke")
os.environ.setdefault("LAB_FIGURES", tempfile.mkdtemp(prefix="lab-figures-"))
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For modules of tiny models: a second torch thread only adds waiting, badly so on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
