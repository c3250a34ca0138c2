"""Model Stock (Jang et al., ECCV 2024): merge two fine-tuned runs from one start, pulled towards the
pre-trained weights. Not one of the four papers, so no notebook of its own: it composes with any of their methods
through the registry and the runner ("mms+bma+stock").

Modifier: `stock`; alias `model-stock` (= "ft+stock"). Primitives: lib.averaging.model_stock and
model_stock_ratios.
"""
import copy

from ..averaging import model_stock, model_stock_ratios
from ..train import finetune
from .base import Modifier, alias, get_method, register


@register
class ModelStock(Modifier):
    """Model Stock (Jang et al., ECCV 2024) as a modifier: the base method trains twice from the same pre-trained
    weights, with the run's seed and with seed + `stock_seed_offset`, and the returned model is
    lib.averaging.model_stock(pre-trained, first run, second run), a per-tensor t = 2cos/(1+cos) pull of the two
    runs' mean towards the pre-trained weights. "X+stock" costs two runs of X.

    Our choices: the second run is a nested lib.train.finetune of a fresh copy of the base method, started from
    finalize, so the loop stays one loop; the default offset 1000 keeps the partner seeds of a sweep over seeds
    0, 1, 2 apart from the sweep's own seeds. Put "stock" last ("mms+bma+stock"): a modifier after it would
    replace the merged model. `stock_ratios` (per tensor: name, cos, t) and `partner` (the second run's Trained)
    are kept for inspection. Methods that do not train, and those whose start depends on the seed (`seeded_start`:
    vision-only's random head), so that the two runs would not share a start, are rejected."""
    name = "stock"
    MODIFIER_HPARAMS = dict(stock_seed_offset=1000)

    def __init__(self, base, **hparams):
        # Before Modifier's own check, whose message ("acts on training steps") would not say why stock needs both.
        if not base.trains or base.seeded_start:
            raise ValueError(f"stock merges two fine-tuned runs from one shared start; {base.name!r} "
                             f"{'does not train' if not base.trains else 'starts each seed from a new random head'}.")
        super().__init__(base, **hparams)
        offset = self.hparams["stock_seed_offset"]
        if isinstance(offset, bool) or not isinstance(offset, int) or offset == 0:
            raise ValueError(f"stock: stock_seed_offset must be a non-zero integer (the second run's seed is "
                             f"seed + offset); got {offset!r}")

    def setup(self, model, tokenizer, train_set, num_steps, seed):
        # The start both runs share: the pre-trained weights, before the base method touches the model.
        self.theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.second_run = dict(train_set=train_set, tokenizer=tokenizer, num_steps=num_steps,
                               seed=seed + self.hparams["stock_seed_offset"])
        super().setup(model, tokenizer, train_set, num_steps, seed)

    def finalize(self, model, history):
        first = super().finalize(model, history)
        start = copy.deepcopy(first.model)
        start.load_state_dict(self.theta_0)
        partner = get_method(self.base.name, **{k: v for k, v in self.hparams.items()
                                                 if k not in self.MODIFIER_HPARAMS})
        device = next(model.parameters()).device
        self.partner = finetune(start, partner, device=device, progress=False, **self.second_run)
        theta_a, theta_b = first.model.state_dict(), self.partner.model.state_dict()
        self.stock_ratios = model_stock_ratios(self.theta_0, theta_a, theta_b)
        first.model.load_state_dict(model_stock(self.theta_0, theta_a, theta_b))
        return first


alias("model-stock", "ft+stock")
