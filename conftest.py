"""Settings for every pytest run, whatever paths it is given (`tests`, or a notebook alone for nbval): set before any
notebook kernel starts, which inherits them. A notebook run without them would train at its default budget."""
import os
import tempfile

os.environ.setdefault("LAB_BUDGET", "smoke")  # quick budgets
os.environ.setdefault("LAB_FIGURES", tempfile.mkdtemp(prefix="lab-figures-"))  # figures away from figures/
os.environ.setdefault("TQDM_DISABLE", "1")
# One cache for every test process (pytest-xdist's workers, notebook kernels): a file in it is keyed by its inputs.
os.environ.setdefault("LAB_CACHE", os.path.join(tempfile.gettempdir(), "robust-clip-lab-tests"))
os.environ.setdefault("LAB_WORKERS", "1")  # one process: tests count calls in it (test_parallel asks for workers)
