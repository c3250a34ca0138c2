"""WILDS iWildCam (v2.0) and FMoW (v1.1), read from their release folders as the `wilds` package splits them.

data_root is what WILDS calls root_dir: it holds iwildcam_v2.0/ (metadata.csv, train/<filename>) and fmow_v1.1/
(rgb_metadata.csv, country_code_mapping.csv, images/rgb_img_<row>.png). The splits follow the `wilds` package
2.0 (wilds/datasets/iwildcam_dataset.py, fmow_dataset.py):
- iWildCam: metadata.csv's split column: train; ID ("cis") id_val and id_test; OOD ("trans", other camera
  locations) val and test. Labels are its y column (0-181); the group is location_remapped.
- FMoW (split scheme "official" = time_after_2016): OOD test = the release's test rows taken in 2016 or later,
  OOD val = its val rows taken in 2013-2015, ID val/test/train = the val/test/train rows taken before 2013; every
  other row (e.g. a test row of 2014, a train row of 2013) is in no split, and the sequestered "seq" rows are
  left out. The image of metadata row i (seq rows counted) is images/rgb_img_<i>.png. Region = the region of
  the row's country code in country_code_mapping.csv, "Other" when it has none.
The `wilds` package is not needed (its import contacts the network; FMoW's evaluation needs torch_scatter).

A Benchmark has two domains: "id" (training, ID validation and ID test images) and "ood" (OOD test), so that
lib.evaluate.summarize's id and domain_shift are WILDS's ID test and OOD test. Every class is a base class
(paper 2 is closed-set). Per-item metadata: "split" (WILDS's split name) and the group (iWildCam "location",
FMoW "region"); the training images also carry "weight" for group-balanced sampling.

Paper 2 (arXiv 2311.02236, mit-ll/robust-vision-language-finetuning) trains with WILDS's standard loader and
uniform_over_groups=True (fmdg/_data.py): a WeightedRandomSampler, with replacement, each group equally likely per
draw; lib.train draws batches that way when the training set has a "weight" (group_balanced=True, the default
here). Its data fractions are WILDS's get_subset(frac=...): a random subset of round(frac * n) training images.
Paper 2's prompts and class names (fmdg/_archs.py) are TEMPLATES and CLASSES; they are facts of the paper's code,
kept as they are: FMoW's "race_track" keeps its underscore, and iWildCam's list names two pairs of classes alike
("unknown bird", "central American red brocket"), which is why classes are identified by label, never by name.
"""
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .benchmark import Benchmark
from .imageset import ImageSet

FOLDERS = {"iWildCam": "iwildcam_v2.0", "FMoW": "fmow_v1.1"}
GROUP_BY = {"iWildCam": "location", "FMoW": "region"}
TEMPLATES = {"iWildCam": ("this is a photo of {}.",), "FMoW": ("a centered satellite photo of {}.",)}
# The metrics each dataset reports (WILDS's leaderboard; paper 2): lib.evaluate adds them as columns.
METRICS = {"iWildCam": ("macro_f1",), "FMoW": ("worst_region_accuracy",)}
SPLITS = ("train", "id_val", "id_test", "val", "test")  # WILDS's names; val and test are the OOD ones
# FMoW's time_after_2016: test from 2016 on, OOD val the three years before (WILDS: year - 3).
FMOW_OOD_TEST_FROM, FMOW_OOD_VAL_FROM = pd.Timestamp("2016-01-01", tz="UTC"), pd.Timestamp("2013-01-01", tz="UTC")

FMOW_CLASSES = (
    'airport', 'airport hangar', 'airport terminal', 'amusement park', 'aquaculture', 'archaeological site', 'barn',
    'border checkpoint', 'burial site', 'car dealership', 'construction site', 'crop field', 'dam',
    'debris or rubble', 'educational institution', 'electric substation', 'factory or powerplant', 'fire station',
    'flooded road', 'fountain', 'gas station', 'golf course', 'ground transportation station', 'helipad', 'hospital',
    'impoverished settlement', 'interchange', 'lake or pond', 'lighthouse', 'military facility',
    'multi-unit residential', 'nuclear powerplant', 'office building', 'oil or gas facility', 'park',
    'parking lot or garage', 'place of worship', 'police station', 'port', 'prison', 'race_track', 'railway bridge',
    'recreational facility', 'road bridge', 'runway', 'shipyard', 'shopping mall', 'single-unit residential',
    'smokestack', 'solar farm', 'space facility', 'stadium', 'storage tank', 'surface mine', 'swimming pool',
    'toll booth', 'tower', 'tunnel opening', 'waste disposal', 'water treatment facility', 'wind farm', 'zoo',
)
IWILDCAM_CLASSES = (
    'empty', 'White-lipped peccary', 'Central American agouti', 'Lowland paca', 'Cougar', 'South American tapir',
    'Collared peccary', 'Red brocket', 'Ocelot', 'Ruddy quail-dove', 'South American coati', 'Nine-banded armadillo',
    'Tayra', 'Common opossum', 'Crab-eating raccoon', 'Jaguar', 'Giant anteater', 'Great tinamou', 'Tapeti',
    'Jaguarundi', 'Margay', 'Brown Brocket', 'Gray four-eyed opossum', 'Wild goat', 'Cattle Cow Bull', 'Sheep',
    'Wolf', 'Scrub hare', 'Olive baboon', 'Common genet', 'Cape bushbuck', 'Slender mongoose',
    'African bush elephant', 'Gambian pouched rat', 'Steenbok', 'Striped hyena', 'Impala', 'Spotted hyena', 'Caracal',
    'Wild horse', 'Lion', 'Common eland', 'Waterbuck', 'Common warthog', 'Leopard', 'White-tailed mongoose',
    'Black-backed jackal', 'African buffalo', 'Plains zebra', 'Giraffe', 'Hartebeest', 'Vervet monkey',
    "Günther's dik-dik", 'Bushpig', "Grant's gazelle", "Thomson's gazelle", 'Common ostrich', 'Aardvark', 'Cheetah',
    'White-bellied bustard', 'Wildcat', 'East African oryx', 'Buff-crested bustard', 'Kori bustard',
    'Black-bellied bustard', 'Great argus', 'Leopard cat', 'Banded palm civet', 'Indian muntjac', 'Wild boar',
    'Sun bear', 'Sambar deer', 'Malayan porcupine', 'Asian golden cat', 'Tiger', 'Three-striped ground squirrel',
    'Common emerald dove', 'Cape genet', 'Crested porcupine', 'African wild dog', 'Rock hyrax', 'Dog', 'unknown bird',
    'unknown bat', 'Amazonian motmot', 'Black agouti', 'Geotrygon', 'White-nosed coati', 'Northern tamandua',
    'opossum', 'crested guan', 'hummingbird', 'plain parakeet', 'dromedary', 'bat-eared fox', 'vulturine guineafowl',
    'zebra', 'aardwolf', 'serval', 'greater kudu', 'hippopotamus', 'spotted thick-knee', 'masked palm civet',
    'marbled cat', 'dhole', 'asian water monitor', 'yellow-throated marten', 'banded linsang', 'crested partridge',
    "salvadori's pheasant", 'bronze-tailed peacock-pheasant', 'sunda pangolin', 'sumatran serow', 'macaque',
    'handsome spurfowl', "L'Hoest's monkey", 'black-fronted duiker', 'african brush-tailed porcupine', 'chimpanzee',
    'blue monkey', 'mountain squirrel', 'western yellow wagtail', 'yellow-whiskered greenbul', 'little greenbul',
    'charming thicket rat', 'forest giant squirrel', "Boehm's bush squirrel", 'yellow-backed duiker',
    'common rufous-nosed rat', 'moustached grass warbler', "Peters's striped mouse", 'african wading rat',
    'stella wood mouse', 'servaline genet', 'side-striped jackal', 'african pygmy mouse', "Ross's turaco",
    'tambourine dove', "tullberg's soft-furred mouse", 'big-eared swamp rat', 'egyptian goose', 'link rat',
    'grey-winged francolin', 'olive thrush', 'brocket deer', 'gray fox', 'ocellated turkey', 'great curassow',
    'lowland paca', "Baird's tapir", 'raccoon', 'white-tailed deer', 'grey-headed dove',
    'central American red brocket', 'striped hog-nosed skunk', 'yucatan brown brocket', 'plain chachalaca',
    "Thomas's langur", 'sunda clouded leopard', 'sumatran hog badger', 'mouse-deer', 'sumatran treepie',
    'rufous-vented niltava', 'silver-eared mesia', 'red-billed partridge', 'gallopheasants', 'javan whistling thrush',
    'crestless fireback', 'crested serpent eagle', 'blue whistling thrush', 'collared mongoose', 'crab-eating fox',
    'motorcycle', 'deer mouse', 'jaguarundi', 'bare-throated tiger heron', 'blue ground dove', 'red squirrel',
    'unknown bird', 'grey-cowled wood rail', 'unknown dove', 'central American red brocket',
)
CLASSES = {"iWildCam": IWILDCAM_CLASSES, "FMoW": FMOW_CLASSES}
# The release's file names of FMoW's categories: paper 2's names with spaces as underscores (WILDS's `categories`).
FMOW_CATEGORIES = tuple(name.replace(" ", "_") for name in FMOW_CLASSES)
NEEDED = {"iWildCam": ("metadata.csv", "train"),
          "FMoW": ("rgb_metadata.csv", "country_code_mapping.csv", "images")}
LAYOUT = """Expected layout (the WILDS releases, as wilds.get_dataset(..., root_dir=data_root) reads them):
    {root}/
      iwildcam_v2.0/   metadata.csv train/<filename>
      fmow_v1.1/       rgb_metadata.csv country_code_mapping.csv images/rgb_img_<row>.png"""


def folder(dataset, data_root):
    """The release folder of a WILDS dataset under data_root, checked for the files its loader reads."""
    if dataset not in FOLDERS:
        raise ValueError(f"Unknown WILDS dataset {dataset!r}; choose one of {list(FOLDERS)}.")
    path = Path(data_root) / FOLDERS[dataset]
    missing = [name for name in NEEDED[dataset] if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {missing}: unpack the WILDS release of {dataset} there.\n"
                                f"{LAYOUT.format(root=data_root)}")
    return path


def read_table(dataset, data_root):
    """Every image of a WILDS dataset that belongs to a split, in WILDS's order: a DataFrame with columns path,
    label, split (train, id_val, id_test, val = OOD val, test = OOD test) and the group (GROUP_BY)."""
    path = folder(dataset, data_root)
    table = _read_iwildcam(path) if dataset == "iWildCam" else _read_fmow(path)
    return table[table.split.notna()].reset_index(drop=True)


def _read_iwildcam(path):
    table = pd.read_csv(path / "metadata.csv")
    if not table.y.between(0, len(IWILDCAM_CLASSES) - 1).all():
        raise ValueError(f"{path / 'metadata.csv'} has labels y outside 0-{len(IWILDCAM_CLASSES) - 1}: not the v2.0 "
                         f"release that paper 2's class names index.")
    return pd.DataFrame({"path": [str(path / "train" / name) for name in table.filename], "label": table.y,
                         "split": table.split.where(table.split.isin(SPLITS)), "location": table.location_remapped})


def _read_fmow(path):
    meta = pd.read_csv(path / "rgb_metadata.csv")
    codes = pd.read_csv(path / "country_code_mapping.csv")
    unknown = sorted(set(meta.category) - set(FMOW_CATEGORIES))
    if unknown:
        raise ValueError(f"{path / 'rgb_metadata.csv'} has categories {unknown[:5]} that FMoW v1.1 does not have.")
    time = pd.to_datetime(meta.timestamp, utc=True, format="ISO8601")  # some stamps have fractions of a second
    ood_test = time >= FMOW_OOD_TEST_FROM
    ood_val = (time >= FMOW_OOD_VAL_FROM) & ~ood_test
    split = meta.split.where(~(ood_test | ood_val) & meta.split.isin(["train", "val", "test"]))
    split = split.replace({"val": "id_val", "test": "id_test"})
    split[ood_test & (meta.split == "test")] = "test"
    split[ood_val & (meta.split == "val")] = "val"
    region = meta.country_code.map(dict(zip(codes["alpha-3"], codes["region"]))).fillna("Other")
    return pd.DataFrame({"path": [str(path / "images" / f"rgb_img_{row}.png") for row in range(len(meta))],
                         "label": meta.category.map({c: i for i, c in enumerate(FMOW_CATEGORIES)}),
                         "split": split, "region": region})


def group_weights(groups):
    """Per-item sampling weights that make every group equally likely per draw (1 / the item's group size), as
    WILDS's uniform_over_groups."""
    groups = pd.Series(np.asarray(groups))
    return (1.0 / groups.map(groups.value_counts())).to_numpy()


def load(root, dataset, train_domains=("id",), n_train_per_class=None, n_test_per_class=None, seed=0,
         partial=False, fraction=1.0, group_balanced=True):
    """A WILDS dataset as a Benchmark (lib.data's table of loaders): domains "id" (ID test) and "ood" (OOD test),
    every class in one group "base" by id (iWildCam's list names two classes twice), paper 2's prompt, and the
    dataset's metrics (macro-F1, worst-region accuracy). Trains on the ID training split: train_domains ["id"].
    The release has no published counts to check (partial is accepted for the table's sake); its images are
    checked for presence only (hundreds of thousands of files). fraction and group_balanced: load_splits."""
    check(root, dataset, train_domains)
    train, validation, test = load_splits(dataset, root, n_train_per_class, n_test_per_class, seed, fraction,
                                          group_balanced)
    classes = list(CLASSES[dataset])
    return Benchmark(dataset, train, test, ["id"], ["id", "ood"], classes, [], validation,
                     class_groups={"base": list(range(len(classes)))}, prompts=TEMPLATES[dataset],
                     metrics=METRICS[dataset])


def check(root, dataset, train_domains):
    """The cheap check before training: the release folder's metadata and image folder, and train_domains ["id"]."""
    folder(dataset, root)
    if list(train_domains) != ["id"]:
        raise ValueError(f"{dataset} trains on its ID training split: set train_domains to ['id'] (its test domains "
                         f"are 'id', the ID test split, and 'ood', the OOD test split); got {list(train_domains)}.")


def load_splits(dataset, data_root, n_train_per_class=None, n_test_per_class=None, seed=0, fraction=1.0,
                group_balanced=True):
    """(train, validation, test) ImageSets of a WILDS dataset: train = a `fraction` of WILDS's train split (a
    seeded random subset of round(fraction * n) images, as get_subset(frac=...)), then at most n_train_per_class
    images per class (None keeps all; a size for dry runs); validation = ID val; test = ID test (domain "id") and
    OOD test (domain "ood"), each capped at n_test_per_class images per class and domain. group_balanced: the
    training images carry the "weight" of group-balanced sampling (lib.train draws with it)."""
    from . import folders
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1]; got {fraction}")
    table = read_table(dataset, data_root)
    group = GROUP_BY[dataset]
    everything = ImageSet(images=list(table.path), labels=torch.tensor(table.label.to_numpy()),
                          classnames=list(CLASSES[dataset]),
                          domains=["ood" if s in ("val", "test") else "id" for s in table.split],
                          metadata={"split": table.split.to_numpy(), group: table[group].to_numpy()})

    def part(*splits):
        return everything.subset(np.flatnonzero(table.split.isin(splits)))
    train, validation, test = part("train"), part("id_val"), part("id_test", "test")
    keep = np.random.default_rng(seed).permutation(len(train))[:int(round(fraction * len(train)))]
    train = train.subset(np.sort(keep))
    if n_train_per_class is not None:
        train = folders.k_shot(train, n_train_per_class, seed)
    if n_test_per_class is not None:
        test = folders.k_shot(test, n_test_per_class, seed)
        validation = folders.k_shot(validation, n_test_per_class, seed)
    if group_balanced:
        train.metadata["weight"] = group_weights(train.metadata[group])
    missing = [p for part_ in (train, validation, test) for p in part_.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in the metadata of {dataset} are missing, e.g. "
                                f"{missing[:3]}: the release under {data_root} is incomplete.")
    return train, validation, test
