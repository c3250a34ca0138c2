import os
import tempfile

# Before any notebook kernel starts (nbval, papermill): quick budgets, and figures away from figures/.
os.environ.setdefault("LAB_BUDGET", "smoke")
os.environ.setdefault("LAB_FIGURES", tempfile.mkdtemp(prefix="lab-figures-"))
os.environ.setdefault("TQDM_DISABLE", "1")
