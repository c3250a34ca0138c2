"""The registry of fine-tuning methods: the interface and registry in lib.methods.base, the baselines in
lib.methods.baselines, then one module per paper, each registering its own methods:

| paper | notebook | module |
| --- | --- | --- |
| CLIPood | 01_clipood | lib.methods.clipood: mms, bma, clipood |
| Robust fine-tuning of VLMs for DG | 02_robust_ft_swa | lib.methods.robust_ft: ce, vision-only, swa, ce-swa |
| FLYP and ARF | 03_arf_anchors | lib.methods.arf: flyp, arf, arf-cap, arf-ret |
| SAFT | 04_saft | lib.methods.saft: saft |
| Model Stock | (runner) | lib.methods.model_stock: stock, model-stock |

zeroshot, lp, ft and lp-ft live in lib.methods.baselines. Importing this package imports every module, so that
get_method knows every name.
"""
from . import arf, baselines, clipood, model_stock, robust_ft, saft  # noqa: F401 (each registers its methods)
from .arf import AnchorRobustFineTune, CaptionAnchors, ContrastiveFineTune, RetrievedAnchors
from .base import ALIASES, METHODS, MODIFIERS, Method, Modifier, Watcher, alias, get_method, register
from .baselines import (FineTune, FrozenTextMethod, LinearHead, LinearHeadTuning, LinearProbe,
                        LinearProbeThenFineTune, ZeroShot)
from .clipood import BetaAverage, MarginMetricSoftmax
from .model_stock import ModelStock
from .robust_ft import EndToEndCrossEntropy, StochasticWeightAveraging, VisionOnly
from .saft import SparseAdaptation
