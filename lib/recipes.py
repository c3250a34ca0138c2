"""The papers' own settings, one recipe per published table, as data: every value with its source beside it, and
the published figures (transcribed from the papers; the table or section is named). `python -m lib.reproduce`
runs a recipe through lib.runner and prints our numbers beside the published ones.

A recipe is a complete setting: the model and its weights, the runs (a lib.data dataset name, its train domains
and the loader's own dataset options, as the runner's --dataset-option takes them), shots (n_train_per_class) or
data fraction, steps (or epochs: lib.reproduce turns them into steps from the training set it loads) and batch,
every method's hyperparameters, the prompts and the evaluation sets (the benchmark's test domains), then the
columns of the published table and how each is computed from the runner's tidy results. A value that is a dict
keyed by dataset names (e.g. CLIPood's learning rate) is per dataset: each run takes its own.

The loaders' protocols the recipes use: DomainBed (lib.data.folders) "leave-one-domain-out" (one run per target,
trained on every other domain), "in-the-wild" and "domain-shift"; ImageNet (lib.data.imagenet) "domain-shift" and
"base-to-new"; CoOp (lib.data.coop) "base-to-new"; and on any of them the option cross_dataset=[CoOp names].

Where a paper leaves a value open, or where the lab cannot do what the paper did, the source says "ours" and the
recipe's `notes` say what differs. A published row whose method the lab lacks keeps its figures and is listed in
`missing`; a table whose figures the project has not transcribed says so in `published_source`.
"""
from dataclasses import dataclass, field
from typing import NamedTuple

from .data import coop, folders


class Sourced(NamedTuple):
    """A value and where it comes from (a paper's section or table, or a file of its public code)."""
    value: object
    source: str


@dataclass(frozen=True)
class Column:
    """A column of a published table, computed from the runner's tidy results: the mean of `metric` over the rows
    of `datasets` (None: all), `domains` (names; None: all; "held-out": each run's held-out domain, averaged over
    targets by lib.evaluate.leave_one_domain_out) and `group` (None: all), averaged over seeds; or, with
    `mean_of`, the mean of other columns (the harmonic mean when `harmonic`: CoOp's H)."""
    name: str
    metric: str = "accuracy"
    domains: object = None
    datasets: tuple = None
    group: str = None
    mean_of: tuple = None
    harmonic: bool = False


@dataclass(frozen=True)
class Recipe:
    name: str
    paper: str
    table: str
    model: dict  # model_name, pretrained (Sourced)
    settings: dict  # batch_size, num_steps or epochs, n_train_per_class (shots), ... (Sourced)
    methods: dict  # published row label -> (lab method or None when the lab lacks it, {hparam: Sourced})
    runs: list  # one entry per benchmark: dict(dataset=, train_domains=, dataset_options=)
    columns: list
    published: dict = field(default_factory=dict)  # row label -> {column: value}
    published_source: str = ""
    published_text: tuple = ()  # figures the paper gives in its text, not in a table
    notes: tuple = ()

    @property
    def missing(self):
        return [label for label, (method, _) in self.methods.items() if method is None]

    def sources(self):
        """Every value of the recipe with its source, as rows (what, value, source)."""
        rows = [(name, v.value, v.source) for name, v in {**self.model, **self.settings}.items()]
        for label, (method, hparams) in self.methods.items():
            rows += [(f"{label}: {name}", v.value, v.source) for name, v in hparams.items()]
        return rows


def plain(values):
    """{name: value} of a {name: Sourced or value} dict."""
    return {name: v.value if isinstance(v, Sourced) else v for name, v in values.items()}


def templates(value):
    """Prompt templates as the lab's methods take them ("{}" format strings): "openai-imagenet" stands for the 80
    templates of CLIP's ImageNet ensemble (open_clip.zero_shot_metadata), expanded only when a run is made."""
    if value == "openai-imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
        return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    return list(value)


def _train_domain(dataset):
    """The train domain of a CoOp-protocol dataset: ImageNet's training set, or the dataset itself."""
    return "imagenet" if dataset == "ImageNet" else dataset


COOP_DATASETS = ("ImageNet", *coop.LAYOUTS)
CROSS_DATASETS = ("Caltech101", "Flowers102", "Food101", "SUN397", "DTD", "FGVCAircraft", "StanfordCars",
                  "OxfordPets", "EuroSAT", "UCF101")  # ARF Table 2's column order
IMAGENET_SHIFTS = {"V2": "imagenet-v2", "R": "imagenet-r", "A": "imagenet-a", "Sketch": "imagenet-sketch",
                   "ObjectNet": "objectnet"}


# ----------------------------------------------------------------------------------------------------- CLIPood
CLIPOOD_CODE = "thuml/CLIPood scripts.sh"
CLIPOOD_MAIN = "thuml/CLIPood main.py"
CLIPOOD_DOMAINBED = {  # dataset: (lr, epochs) from scripts.sh
    "PACS": (5e-6, 10), "VLCS": (5e-6, 10), "OfficeHome": (1e-5, 10), "TerraIncognita": (5e-6, 10),
    "DomainNet": (1e-5, 20)}
CLIPOOD_ITERS_PER_EPOCH = 500  # main.py --iters-per-epoch default: an "epoch" is 500 steps, whatever the data size
VIT_B_16 = {"model_name": Sourced("ViT-B-16", "the paper's model (thuml/CLIPood main.py -a default ViT-B/16)"),
            "pretrained": Sourced("openai", "OpenAI's CLIP weights (thuml/CLIPood main.py: clip.load)")}
CLIPOOD_COMMON = dict(weight_decay=Sourced(0.1, f"{CLIPOOD_MAIN} --wd default"),
                      warmup_steps=Sourced(0, f"{CLIPOOD_MAIN}: CosineAnnealingLR, no warm-up"),
                      grad_clip=Sourced(0, f"{CLIPOOD_MAIN}: no gradient clipping"))


def _leave_one_domain_out(datasets, protocol):
    """One run per dataset and target domain: train on every other domain (lib.data.folders.PUBLISHED's)."""
    return [dict(dataset=dataset, train_domains=[d for d in folders.PUBLISHED[dataset]["images"] if d != target],
                 dataset_options=dict(protocol=protocol))
            for dataset in datasets for target in folders.PUBLISHED[dataset]["images"]]


def _clipood_domainbed(name, table, datasets, protocol, lam, columns, published, published_source, notes):
    prompt = Sourced(["a photo of a {}."], "CLIPood engine.py (one template)")
    return Recipe(
        name=name, paper="CLIPood (Shu et al., ICML 2023)", table=table, model=VIT_B_16,
        settings=dict(batch_size=Sourced(12, f"{CLIPOOD_CODE} -b 12"),
                      num_steps=Sourced({d: CLIPOOD_DOMAINBED[d][1] * CLIPOOD_ITERS_PER_EPOCH for d in datasets},
                                        f"{CLIPOOD_CODE} --epochs (10; DomainNet 20) x 500 iterations per epoch "
                                        f"({CLIPOOD_MAIN})"),
                      test_fraction=Sourced(0.2, "DomainBed's 20 % hold-out per domain (CLIPood Table 1)")),
        methods={"CLIP": ("zeroshot", dict(templates=prompt)),
                 "CLIPood": ("clipood", dict(lr=Sourced({d: CLIPOOD_DOMAINBED[d][0] for d in datasets},
                                                        f"{CLIPOOD_CODE} --lr per dataset"),
                                             lam=lam, beta=Sourced(0.5, f"{CLIPOOD_CODE} --beta 0.5"),
                                             templates=prompt, **CLIPOOD_COMMON))},
        runs=_leave_one_domain_out(datasets, protocol), columns=columns, published=published,
        published_source=published_source,
        notes=("One run per target domain, trained on all the others; a column is the held-out domain's accuracy "
               "on its 20 % hold-out, averaged over targets by lib.evaluate.leave_one_domain_out.",
               "CLIPood reports the BMA model (main.py evaluates both); `clipood` returns it.",
               "lr and num_steps are per dataset: lib.reproduce picks each run's own.", *notes))


def _clipood_table_1():
    return _clipood_domainbed(
        "clipood-table1", "Table 1: domain shift on DomainBed, leave-one-domain-out, accuracy %",
        tuple(CLIPOOD_DOMAINBED), "leave-one-domain-out", Sourced(0.3, f"{CLIPOOD_CODE} --lambda 0.3"),
        [Column(d, domains="held-out", datasets=(d,)) for d in CLIPOOD_DOMAINBED],
        {"CLIP": dict(PACS=96.2, VLCS=81.7, OfficeHome=82.0, TerraIncognita=33.4, DomainNet=57.5),
         "CLIPood": dict(PACS=97.3, VLCS=85.0, OfficeHome=87.0, TerraIncognita=60.4, DomainNet=63.5)},
        "CLIPood Table 1 (transcribed by hand in the project's papers notes; check the paper)", ())


def _clipood_in_the_wild():
    datasets = ("OfficeHome", "DomainNet")
    return _clipood_domainbed(
        "clipood-in-the-wild", "In the wild: OfficeHome and DomainNet, base and new classes of a held-out domain "
        "classified among both, accuracy %", datasets, "in-the-wild",
        Sourced(0.1, "CLIPood, the in-the-wild setting (the project's papers notes)"),
        [Column(f"{d} {group}", domains="held-out", datasets=(d,), group=group)
         for d in datasets for group in ("base", "new")],
        {}, "none transcribed (the project's papers notes give this setting's protocol, not its figures)",
        ("Train domains: every domain but the target, as in Table 1 (ours: the papers notes do not say).",
         "Base classes: the first floor(n/2) sorted class folders (lib.data.folders protocol in-the-wild)."))


CLIPOOD_OPEN_CLASS_EPOCHS = dict(ImageNet=10, Caltech101=1, OxfordPets=1, StanfordCars=5, Flowers102=1, Food101=1,
                                 FGVCAircraft=10, SUN397=5, DTD=1, EuroSAT=1, UCF101=2)
BASE_NEW_COLUMNS = [Column("base", group="base"), Column("new", group="new"),
                    Column("H", mean_of=("base", "new"), harmonic=True)]


def _base_to_new_runs():
    return [dict(dataset=d, train_domains=[_train_domain(d)], dataset_options=dict(protocol="base-to-new"))
            for d in COOP_DATASETS]


def _clipood_open_class():
    return Recipe(
        name="clipood-open-class", paper="CLIPood (Shu et al., ICML 2023)",
        table="Open-class table: CoOp's base-to-new on 11 datasets, 16 shots, average accuracy % (base, new, H)",
        model=VIT_B_16,
        settings=dict(batch_size=Sourced(36, f"{CLIPOOD_CODE} -b 36"),
                      n_train_per_class=Sourced(16, f"{CLIPOOD_CODE} --n-shot 16"),
                      num_steps=Sourced({d: e * CLIPOOD_ITERS_PER_EPOCH for d, e in CLIPOOD_OPEN_CLASS_EPOCHS.items()},
                                        f"{CLIPOOD_CODE} --epochs per dataset x 500 iterations ({CLIPOOD_MAIN})")),
        methods={"CLIP": ("zeroshot", {}),
                 "CLIPood": ("clipood", dict(lr=Sourced(5e-6, f"{CLIPOOD_CODE} --lr 5e-6"),
                                             lam=Sourced(0.3, f"{CLIPOOD_CODE} --lambda 0.3"),
                                             beta=Sourced(0.1, f"{CLIPOOD_CODE} --beta 0.1 (open class)"),
                                             **CLIPOOD_COMMON))},
        runs=_base_to_new_runs(), columns=BASE_NEW_COLUMNS,
        published_source="none transcribed (the project's papers notes give this table's protocol, not its figures)",
        notes=("Prompts: the benchmark's (CoOp's per-dataset prompt, SAFT Table 7); CLIPood's code was not checked "
               "for them.", "Each column is the mean over the 11 datasets; H is the harmonic mean of base and new."))


# ------------------------------------------------------------------------------ paper 2 (arXiv 2311.02236)
P2_TRAIN = "mit-ll/robust-vision-language-finetuning train.py"
P2_MODEL = "mit-ll/robust-vision-language-finetuning fmdg/_model.py"
P2_ARCHS = "mit-ll/robust-vision-language-finetuning fmdg/_archs.py"
P2_FRACTIONS = (0.03, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # generate_lim_data_config.py PERCS (0: the CLIP row)


def _paper2(dataset, metric_columns, prompt):
    from .data.wilds import TEMPLATES
    common = dict(lr=Sourced(1e-5, f"{P2_TRAIN} --lr default (swept over 1e-2..1e-5 in generate_lim_data_config.py)"),
                  weight_decay=Sourced(1e-4, f"{P2_TRAIN}: 1e-4 for iWildCam and FMoW"),
                  warmup_steps=Sourced(0, "ours (the paper: 5 warm-up epochs, then StepLR)"),
                  grad_clip=Sourced(0, f"{P2_TRAIN}: no clipping"),
                  templates=Sourced(list(TEMPLATES[dataset]), f"{P2_ARCHS} text_prefix ({prompt!r})"))
    swa = dict(swa_start=Sourced(round(20 / 30, 6), f"{P2_TRAIN}: --swa-epochs 10 of --nepochs 30"),
               swa_every=Sourced(None, f"once per epoch ({P2_MODEL})"),
               swa_lr=Sourced(1e-4, f"{P2_MODEL} SWALR, --swa-lr default 1e-4"),
               swa_anneal=Sourced(10, f"{P2_TRAIN}: SWALR anneal_epochs 10"))
    return Recipe(
        name=f"paper2-{dataset.lower()}",
        paper="Robust fine-tuning of VLMs for domain generalization (arXiv 2311.02236)",
        table=f"{dataset}: ID and OOD test against the data fraction (the paper's figures)",
        model={"model_name": Sourced("ViT-B-32", f"{P2_TRAIN} --arch vitb32_clip_finetune"),
               "pretrained": Sourced("openai", "OpenAI's CLIP weights (fmdg/_wrappers.py)")},
        settings=dict(batch_size=Sourced(128, f"{P2_TRAIN} --batch-size default"),
                      epochs=Sourced(30, f"{P2_TRAIN} --nepochs default"),
                      fraction=Sourced(list(P2_FRACTIONS), "generate_lim_data_config.py PERCS"),
                      group_balanced=Sourced(True, "fmdg/_data.py: uniform_over_groups=True")),
        methods={"CLIP": ("zeroshot", dict(templates=common["templates"])),
                 "CLIP fine-tuned (CE)": ("ce", common),
                 "CLIP fine-tuned + SWA": ("ce-swa", {**common, **swa})},
        runs=[dict(dataset=dataset, train_domains=["id"], dataset_options={})],
        columns=metric_columns,
        published_source="none transcribed: the paper reports these as plots",
        published_text=("few-shot CLIP fine-tuning beats a vision-only model ID and OOD at every data fraction; "
                        "CE + SWA improves OOD further (the paper's headline)",),
        notes=(f"Optimizer: the lab's AdamW with the paper's weight decay 1e-4 (the paper: Adam with L2 decay, "
               f"{P2_TRAIN}).",
               "Schedule: the lab's cosine decay without warm-up until averaging starts, then torch's SWALR towards "
               "swa_lr 1e-4 (anneal over 10 epochs), as the paper's averaging phase; before it the paper runs 5 "
               "warm-up epochs and StepLR (x0.1 every 15 epochs) instead of the cosine.",
               "Augmentation: none, the model's preprocessing (the paper adds flips, colour jitter, 2-degree "
               "rotations: fmdg/_data.py).",
               "Model selection: the last (or SWA) model; the paper's code keeps the best OOD test score.",
               "The vision-only baseline (an ImageNet ViT-B/32) is not in the lab: the lab's `vision-only` is CLIP's "
               "image tower with a linear head, so it is left out of this recipe.",
               "The CLIP row is fraction 0 (zero-shot)."))


def _paper2_iwildcam():
    return _paper2("iWildCam", [Column("ID test macro-F1", "macro_f1", domains=("id",)),
                                Column("OOD test macro-F1", "macro_f1", domains=("ood",)),
                                Column("ID test accuracy", domains=("id",)),
                                Column("OOD test accuracy", domains=("ood",))], "this is a photo of {}.")


def _paper2_fmow():
    return _paper2("FMoW", [Column("ID test accuracy", domains=("id",)), Column("OOD test accuracy", domains=("ood",)),
                            Column("OOD worst-region accuracy", "worst_region_accuracy", domains=("ood",))],
                   "a centered satellite photo of {}.")


# --------------------------------------------------------------------------------------------------------- ARF
ARF = "ARF (Han et al., CVPR 2024), training details"


def _arf_methods():
    common = dict(lr=Sourced(1e-5, ARF), weight_decay=Sourced(0.1, ARF),
                  templates=Sourced("openai-imagenet", f"{ARF}: CLIP's ImageNet templates (WiSE-FT's)"))
    anchors = dict(captions=Sourced(None, "lib.reproduce --captions (python -m lib.captions; ARF: BLIP-2)"),
                   candidates=Sourced(None, "lib.reproduce --candidates (CC3M webdataset shards, ARF's candidate set)"))
    prompts = dict(templates=common["templates"])
    lp_ft = dict(lr=Sourced(1e-5, f"ours: ARF's fine-tuning lr ({ARF} does not give LP-FT's)"),
                 weight_decay=common["weight_decay"], templates=common["templates"])
    return {"CLIP": ("zeroshot", prompts), "LP": ("lp", prompts), "FT": ("ft", common), "LP-FT": ("lp-ft", lp_ft),
            "FLYP": ("flyp", common), "ARF": ("arf", {**common, **anchors})}


ARF_SETTINGS = dict(batch_size=Sourced(512, ARF), epochs=Sourced(10, ARF))
VIT_B_16_ARF = {"model_name": Sourced("ViT-B-16", ARF), "pretrained": Sourced("openai", ARF)}
ARF_CROSS_DATASET_RUN = dict(dataset="ImageNet", train_domains=["imagenet"],
                             dataset_options=dict(protocol="domain-shift", cross_dataset=list(CROSS_DATASETS)))
ARF_NOTES = ("ARF's k, loss weights and batch composition are not published: the lab's arf defaults (k=8, "
             "weights 1, anchor_fraction 0.5).",)


def _arf_table1(dataset, id_domain, shifts, rows, notes=()):
    """ARF Table 1 on one dataset: fine-tuned on `id_domain`, tested on it (ID) and on each shift {column: domain}."""
    names = ["ID", *shifts, "avg OOD"]
    return Recipe(
        name=f"arf-table1-{dataset.lower()}", paper="ARF (Han et al., CVPR 2024)",
        table=f"Table 1: {dataset}{'-Real' if dataset == 'DomainNet' else ''} -> {', '.join(names)}; accuracy %",
        model=VIT_B_16_ARF, settings=ARF_SETTINGS, methods=_arf_methods(),
        runs=[dict(dataset=dataset, train_domains=[id_domain], dataset_options=dict(protocol="domain-shift"))],
        columns=[Column("ID", domains=(id_domain,)), *[Column(n, domains=(d,)) for n, d in shifts.items()],
                 Column("avg OOD", mean_of=tuple(shifts))],
        published={m: dict(zip(names, v)) for m, v in rows.items()}, published_source="ARF Table 1",
        notes=(*ARF_NOTES, *notes))


def _arf_imagenet():
    return _arf_table1("ImageNet", "imagenet", IMAGENET_SHIFTS, {
        "CLIP": (68.3, 61.9, 77.7, 50.0, 48.3, 54.2, 58.4), "LP": (79.9, 69.8, 70.8, 46.4, 46.9, 50.4, 56.9),
        "FT": (81.3, 71.2, 66.1, 37.8, 46.1, 51.6, 54.6), "LP-FT": (81.7, 72.1, 73.5, 47.6, 50.3, 54.4, 59.6),
        "FLYP": (82.6, 73.0, 71.4, 48.1, 49.6, 54.7, 59.4), "ARF": (82.7, 72.8, 75.6, 50.3, 51.8, 55.8, 61.3)})


def _arf_domainnet():
    shifts = {"Sketch": "sketch", "Painting": "painting", "Infograph": "infograph", "Clipart": "clipart"}
    return _arf_table1("DomainNet", "real", shifts, {
        "CLIP": (84.8, 65.7, 68.5, 50.2, 72.1, 64.1), "LP": (86.3, 57.4, 61.5, 45.6, 64.1, 57.2),
        "FT": (89.5, 61.8, 65.6, 49.0, 71.7, 62.1), "LP-FT": (89.5, 63.6, 67.4, 50.7, 73.4, 63.8),
        "FLYP": (89.8, 64.1, 68.5, 50.8, 74.0, 64.3), "ARF": (89.8, 65.3, 69.5, 51.1, 74.9, 65.2)},
        notes=("ID is real's 20 % hold-out (lib.data.folders' per-domain split; ARF's split is not in the project's "
               "papers notes).", "The prompts are CLIP's ImageNet templates, as for ImageNet (no others are "
                                 "transcribed)."))


def _arf_table_2():
    order = ("ImageNet", "Caltech", "Flowers", "Food", "SUN", "DTD", "Aircraft", "Cars", "Pets", "EuroSAT", "UCF",
             "avg OOD")
    rows = {"CLIP": (68.3, 89.3, 70.4, 89.2, 65.2, 46.0, 27.1, 65.6, 88.9, 54.1, 69.8, 66.6),
            "FT": (81.3, 78.8, 16.0, 37.3, 39.3, 29.7, 4.7, 10.8, 80.2, 15.4, 44.3, 35.7),
            "LP-FT": (81.7, 84.0, 44.3, 68.8, 49.9, 37.9, 15.8, 37.7, 81.9, 30.4, 59.5, 51.0),
            "FLYP": (82.6, 87.6, 36.8, 62.8, 52.0, 36.9, 8.7, 31.1, 77.6, 34.3, 58.6, 48.6),
            "ARF": (82.7, 88.6, 46.4, 74.5, 63.8, 40.4, 13.9, 44.7, 83.1, 35.8, 64.6, 55.6)}
    methods = {k: v for k, v in _arf_methods().items() if k in rows}
    methods["LP-FT"] = (None, {})  # lp-ft classifies with its linear head: no columns for the other datasets
    domains = dict(zip(order[1:-1], CROSS_DATASETS))
    return Recipe(
        name="arf-table2", paper="ARF (Han et al., CVPR 2024)",
        table="Table 2: zero-shot on 10 datasets after fine-tuning on ImageNet; accuracy %",
        model=VIT_B_16_ARF, settings=ARF_SETTINGS, methods=methods, runs=[ARF_CROSS_DATASET_RUN],
        columns=[Column("ImageNet", domains=("imagenet",)), *[Column(n, domains=(d,)) for n, d in domains.items()],
                 Column("avg OOD", mean_of=tuple(domains))],
        published={m: dict(zip(order, v)) for m, v in rows.items()}, published_source="ARF Table 2",
        notes=(*ARF_NOTES, "LP-FT: published row only; the lab's lp-ft classifies with its linear head, which has no "
                           "columns for the other datasets' classes.",
               "Each other dataset is a test domain of its own name, classified among all its classes with its own "
               "prompt (lib.data.with_cross_dataset).",
               "arf-table2 and arf-table3 share their runs (the same setting: the store trains them once)."))


def _arf_table_3():
    methods = _arf_methods()
    ablation = {"FLYP": methods["FLYP"], "+ caption anchors": ("arf-cap", methods["ARF"][1]),
                "+ retrieved anchors": ("arf-ret", methods["ARF"][1]), "ARF (both)": methods["ARF"]}
    return Recipe(
        name="arf-table3", paper="ARF (Han et al., CVPR 2024)",
        table="Table 3: ablation on ImageNet, ID / domain shift (avg of 5 shifts) / zero-shot (avg of 10 datasets)",
        model=VIT_B_16_ARF, settings=ARF_SETTINGS, methods=ablation, runs=[ARF_CROSS_DATASET_RUN],
        columns=[Column("ID", domains=("imagenet",)),
                 Column("domain shift", domains=tuple(IMAGENET_SHIFTS.values())),
                 Column("zero-shot", domains=CROSS_DATASETS)],
        published={"FLYP": {"ID": 82.6, "domain shift": 59.4, "zero-shot": 48.6},
                   "+ caption anchors": {"ID": 82.6, "domain shift": 60.7, "zero-shot": 54.3},
                   "+ retrieved anchors": {"ID": 82.6, "domain shift": 60.2, "zero-shot": 53.6},
                   "ARF (both)": {"ID": 82.7, "domain shift": 61.3, "zero-shot": 55.6}},
        published_source="ARF Table 3",
        notes=(*ARF_NOTES, "One run per method: ImageNet with its shifts and the 10 datasets as test domains."))


# -------------------------------------------------------------------------------------------------------- SAFT
SAFT = "SAFT (ECCV 2024, arXiv 2407.03036), experimental setup"
SAFT_TEMPLATES = {"ImageNet": "a photo of a {}.", **coop.PROMPTS}  # SAFT Table 7 (lib.data.coop.PROMPTS)


def _saft(name, table, runs, columns, methods=("CLIP", "FT", "LP-FT", "SAFT"), published=None, published_source="",
          published_text=(), notes=()):
    common = dict(lr=Sourced(5e-6, SAFT), weight_decay=Sourced(0.1, SAFT),
                  warmup_steps=Sourced(0, "ours (SAFT: cosine schedule; no warm-up stated)"),
                  templates=Sourced({d: [t] for d, t in SAFT_TEMPLATES.items()}, "SAFT Table 7, per dataset"))
    rows = {"CLIP": ("zeroshot", dict(templates=common["templates"])), "FT": ("ce", common),
            "LP-FT": ("lp-ft", dict(common, lr=Sourced(5e-6, f"ours: SAFT's lr ({SAFT} does not give LP-FT's)"))),
            "SAFT": ("saft", {**common, "alpha": Sourced(0.001, f"{SAFT}: alpha 0.1 % of all parameters")})}
    return Recipe(
        name=name, paper="SAFT (Sony AI, ECCV 2024)", table=table,
        model={"model_name": Sourced("ViT-B-16", SAFT), "pretrained": Sourced("openai", SAFT)},
        settings=dict(n_train_per_class=Sourced(16, f"{SAFT}: CoOp's protocol, 16 shots"),
                      batch_size=Sourced(32, "ours (not in the project's papers notes)"),
                      num_steps=Sourced(2500, "ours (not in the project's papers notes)")),
        methods={label: rows[label] for label in methods},
        runs=runs, columns=columns, published=published or {}, published_source=published_source,
        published_text=published_text,
        notes=("Prompts: SAFT Table 7, the training dataset's (SAFT_TEMPLATES); a cross-dataset test domain is "
               "prompted with its own (lib.data.with_cross_dataset).",
               "bf16 mixed precision: the lab's autocast on a GPU.", *notes))


def _saft_imagenet():
    shifts = {n: d for n, d in IMAGENET_SHIFTS.items() if n != "ObjectNet"}
    return _saft("saft-imagenet", "Table 1, distribution shift: ImageNet (16 shots) -> V2, Sketch, A, R; accuracy %",
                 [dict(dataset="ImageNet", train_domains=["imagenet"],
                       dataset_options=dict(protocol="domain-shift", variants=["imagenet", *shifts.values()]))],
                 [Column("ID", domains=("imagenet",)), *[Column(n, domains=(d,)) for n, d in shifts.items()],
                  Column("avg OOD", mean_of=tuple(shifts))],
                 published_source="none transcribed: the table's figures are not in the project's papers notes",
                 published_text=("SAFT +5.15 points average OOD accuracy over FT (SAFT, text)",))


def _saft_base_to_new():
    return _saft("saft-base-to-new", "Table 2, base-to-new on CoOp's 11 datasets (16 shots), average; accuracy %",
                 _base_to_new_runs(), BASE_NEW_COLUMNS, methods=("CLIP", "FT", "SAFT"),
                 published={"CLIP": {"base": 69.34, "new": 74.22}, "SAFT": {"base": 83.97, "new": 74.78, "H": 79.11}},
                 published_source="SAFT (text): the 11-dataset averages, CLIP -> SAFT",
                 notes=("LP-FT is left out: a linear head has no columns for the new classes.",))


def _saft_cross_dataset():
    return _saft("saft-cross-dataset", "Table 3, cross-dataset transfer: ImageNet (16 shots) -> 10 datasets, all "
                 "classes; accuracy %",
                 [dict(dataset="ImageNet", train_domains=["imagenet"],
                       dataset_options=dict(protocol="domain-shift", variants=["imagenet"],
                                            cross_dataset=list(CROSS_DATASETS)))],
                 [Column("ImageNet", domains=("imagenet",)), *[Column(d, domains=(d,)) for d in CROSS_DATASETS],
                  Column("avg", mean_of=CROSS_DATASETS)], methods=("CLIP", "FT", "SAFT"),
                 published_source="none transcribed: the table's figures are not in the project's papers notes",
                 notes=("LP-FT is left out: a linear head has no columns for the other datasets' classes.",))


RECIPES = {r.name: r for r in (_clipood_table_1(), _clipood_in_the_wild(), _clipood_open_class(), _paper2_iwildcam(),
                               _paper2_fmow(), _arf_imagenet(), _arf_domainnet(), _arf_table_2(), _arf_table_3(),
                               _saft_imagenet(), _saft_base_to_new(), _saft_cross_dataset())}


def get_recipe(name):
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; the recipes are {sorted(RECIPES)} "
                         f"(python -m lib.reproduce --list).")
    return RECIPES[name]
