"""ShapeWorld 2: a procedural image-text world with domains, base/new classes, clutter and rich captions.

Every image is a scene: a main shape with a colour, a size, a position and a background tone, and up to two
small distractor shapes in the corners, rendered in one of four styles (the domains). Scenes, images and
captions are a pure function of the seed, so every split is reproducible and two splits with different
names never share a scene.

The task shift, shared by every domain: the web corpus's captions name the objects of a cluttered picture in
a random order, as alt-text does, while the downstream benchmark (make_split) labels each picture by its main
object, the large one in the centre, and most downstream pictures have a distractor. Zero-shot CLIP cannot
know that convention, so it leaves headroom in every style; fine-tuning learns it, and part of what it learns
carries over to the styles it did not train on.

    >>> train = make_split("train", domains=["photo"], classes=BASE_CLASSES, n_per_class=32, seed=0)
    >>> train.images.shape        # float in [0, 1]
    torch.Size([192, 3, 32, 32])
"""
import zlib

import numpy as np
import torch

from .imageset import ImageSet

IMAGE_SIZE = 32
DOMAINS = ("photo", "sketch", "cartoon", "painting")
CLASSES = tuple(sorted(["arrow", "circle", "crescent", "cross", "diamond", "ellipse",
                        "heart", "hexagon", "ring", "square", "star", "triangle"]))
BASE_CLASSES = CLASSES[: len(CLASSES) // 2]  # the CoOp convention: sorted names, first half base
NEW_CLASSES = CLASSES[len(CLASSES) // 2:]
COLORS = {"red": (0.85, 0.15, 0.12), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.85),
          "yellow": (0.95, 0.85, 0.1), "purple": (0.55, 0.2, 0.7), "orange": (0.95, 0.5, 0.05)}
SIZES = {"small": 0.3, "large": 0.5}  # radius as a fraction of half the image width
POSITIONS = {"in the center": (0.0, 0.0), "on the left": (-0.42, 0.0), "on the right": (0.42, 0.0),
             "at the top": (0.0, -0.42), "at the bottom": (0.0, 0.42)}
BACKGROUNDS = ("light", "dark")
STYLE_WORDS = {"photo": "photo", "sketch": "sketch", "cartoon": "cartoon", "painting": "painting"}
ATTRIBUTES = {"shape": CLASSES, "color": tuple(COLORS), "size": tuple(SIZES), "position": tuple(POSITIONS),
              "background": BACKGROUNDS, "domain": DOMAINS}
# The web corpus's mix of styles, in the order of DOMAINS: paintings are rare, as art is on the web.
WEB_DOMAIN_SHARES = (0.43, 0.28, 0.28, 0.01)
# A third of the web's pictures are cluttered: a large main object in the centre and one or two small objects
# in the corners. Downstream pictures are cluttered too (a BENCHMARK_CLUTTER_SHARE of them, four in five, each
# with BENCHMARK_DISTRACTORS), and their label is the main object.
WEB_CLUTTER_SHARE = 0.35
MAX_DISTRACTORS = 2
BENCHMARK_DISTRACTORS = 1
BENCHMARK_CLUTTER_SHARE = 0.8
DISTRACTOR_RADIUS = 0.26  # a fraction of half the image width, like SIZES
CORNERS = {"at the top left": (-0.62, -0.62), "at the top right": (0.62, -0.62),
           "at the bottom left": (-0.62, 0.62), "at the bottom right": (0.62, 0.62)}
# Painters stylize: every figure in a painting is drawn this many times wider than in a photo. A model that
# learned shapes from photos reads a wide circle as an ellipse, yet the style is easy to learn from examples.
PAINTING_STRETCH = 1.5
SUPERSAMPLE = 2


def _rng(seed, *names):
    """A generator seeded by the seed and a list of names, so named streams never overlap."""
    key = zlib.crc32("/".join(map(str, names)).encode())
    return np.random.default_rng([int(seed), key])


# ----------------------------------------------------------------------------------------------- shapes
# Each shape is an inside-test on coordinates (x right, y down) in units of the shape's radius.

def _regular_polygon(x, y, sides, rotation=0.0):
    theta = np.arctan2(y, x) - rotation
    sector = 2 * np.pi / sides
    local = np.mod(theta, sector) - sector / 2
    return np.hypot(x, y) * np.cos(local) < np.cos(np.pi / sides)


def _star(x, y):
    theta = np.arctan2(x, -y)  # first point straight up
    r = np.hypot(x, y)
    points = 5
    frac = np.abs(np.mod(theta, 2 * np.pi / points) / (2 * np.pi / points) - 0.5) * 2  # 1 at a tip, 0 between
    return r < 0.45 + 0.55 * frac ** 2


SHAPES = {
    "arrow": lambda x, y: ((np.abs(y) < 0.22) & (x > -0.95) & (x < 0.2))
    | ((x >= 0.05) & (x < 0.95) & (np.abs(y) < (0.95 - x) * 0.85)),
    "circle": lambda x, y: x ** 2 + y ** 2 < 0.85 ** 2,
    "crescent": lambda x, y: (x ** 2 + y ** 2 < 0.9 ** 2) & ((x - 0.45) ** 2 + (y + 0.1) ** 2 > 0.72 ** 2),
    "cross": lambda x, y: ((np.abs(x) < 0.28) & (np.abs(y) < 0.95)) | ((np.abs(y) < 0.28) & (np.abs(x) < 0.95)),
    "diamond": lambda x, y: np.abs(x) / 0.75 + np.abs(y) < 1.0,
    "ellipse": lambda x, y: (x / 0.98) ** 2 + (y / 0.5) ** 2 < 1.0,
    "heart": lambda x, y: ((x * 1.15) ** 2 + (-(y * 1.15) + 0.25) ** 2 - 0.6) ** 3
    - (x * 1.15) ** 2 * (-(y * 1.15) + 0.25) ** 3 * 1.4 < 0,
    "hexagon": lambda x, y: _regular_polygon(x, y, 6),
    "ring": lambda x, y: (x ** 2 + y ** 2 < 0.92 ** 2) & (x ** 2 + y ** 2 > 0.55 ** 2),
    "square": lambda x, y: (np.abs(x) < 0.72) & (np.abs(y) < 0.72),
    "star": _star,
    "triangle": lambda x, y: (y < 0.6) & (np.abs(x) < (y + 0.95) * 0.72),
}
assert tuple(sorted(SHAPES)) == CLASSES


# ----------------------------------------------------------------------------------------------- scenes
def sample_scenes(n, seed, stream, domains=DOMAINS, classes=CLASSES, domain_shares=None,
                  clutter_share=WEB_CLUTTER_SHARE):
    """n random scenes, classes drawn uniformly, domains by domain_shares (uniform if None): numpy arrays.

    A clutter_share of them get one or two distractors (see _scenes). Attributes are indices into ATTRIBUTES;
    jitter (rotation, offset, scale) and a per-scene seed for texture are continuous, so no two scenes of
    different streams coincide.
    """
    rng = _rng(seed, "scenes", stream)
    shape = np.array([CLASSES.index(c) for c in classes])[rng.integers(len(classes), size=n)]
    domain = np.array([DOMAINS.index(d) for d in domains])[rng.choice(len(domains), size=n, p=domain_shares)]
    cluttered = rng.uniform(size=n) < clutter_share
    distractors = np.where(cluttered, rng.integers(1, MAX_DISTRACTORS + 1, size=n), 0)
    return _scenes(rng, shape, domain, distractors)


def _scenes(rng, shape, domain, distractors):
    """Scene arrays. A cluttered scene (distractors > 0) has its main object large and in the centre, and its
    distractors small, in distinct corners, of distinct classes other than the main one; unused distractor
    slots hold -1."""
    n = len(shape)
    scenes = {
        "shape": shape, "domain": domain,
        "color": rng.integers(len(COLORS), size=n), "size": rng.integers(len(SIZES), size=n),
        "position": rng.integers(len(POSITIONS), size=n), "background": rng.integers(len(BACKGROUNDS), size=n),
        "rotation": rng.uniform(-0.2, 0.2, size=n), "offset": rng.uniform(-0.07, 0.07, size=(n, 2)),
        "scale": rng.uniform(0.9, 1.1, size=n), "texture_seed": rng.integers(2 ** 31, size=n),
    }
    # Random orderings with the main class last give distinct distractor classes; the same for corners.
    class_order = np.argsort(rng.uniform(size=(n, len(CLASSES))) + np.eye(len(CLASSES))[shape], axis=1)
    corner_order = np.argsort(rng.uniform(size=(n, len(CORNERS))), axis=1)
    used = np.arange(MAX_DISTRACTORS) < np.asarray(distractors)[:, None]
    scenes.update({
        "distractor_shape": np.where(used, class_order[:, :MAX_DISTRACTORS], -1),
        "distractor_color": np.where(used, rng.integers(len(COLORS), size=(n, MAX_DISTRACTORS)), -1),
        "distractor_corner": np.where(used, corner_order[:, :MAX_DISTRACTORS], -1),
        "distractor_rotation": rng.uniform(-0.2, 0.2, size=(n, MAX_DISTRACTORS)),
    })
    cluttered = used.any(axis=1)
    scenes["size"] = np.where(cluttered, list(SIZES).index("large"), scenes["size"])
    scenes["position"] = np.where(cluttered, list(POSITIONS).index("in the center"), scenes["position"])
    return scenes


def balanced_scenes(n_per_class, seed, stream, domains=DOMAINS, classes=CLASSES, distractors=BENCHMARK_DISTRACTORS,
                    clutter_share=BENCHMARK_CLUTTER_SHARE):
    """n_per_class scenes for every (domain, class) pair, in a fixed order; a clutter_share of them (drawn at
    random) have `distractors` distractors, the others none."""
    rng = _rng(seed, "balanced", stream)
    grid = [(DOMAINS.index(d), CLASSES.index(c)) for d in domains for c in classes for _ in range(n_per_class)]
    domain, shape = (np.array(v) for v in zip(*grid))
    # Which pictures are cluttered comes from a stream of its own, so clutter_share moves no other draw.
    cluttered = _rng(seed, "clutter", stream).uniform(size=len(shape)) < clutter_share
    return _scenes(rng, shape, domain, np.where(cluttered, distractors, 0))


def scene_attributes(scenes, i):
    """The words describing scene i's main object: {"shape": "star", "color": "red", ...}."""
    return {name: values[scenes[name][i]] for name, values in ATTRIBUTES.items()}


def scene_distractors(scenes, i):
    """The words describing scene i's distractors: [{"shape": ..., "color": ..., "position": ...}]."""
    return [{"shape": CLASSES[shape], "color": list(COLORS)[color], "size": "small", "position": list(CORNERS)[corner]}
            for shape, color, corner in zip(scenes["distractor_shape"][i], scenes["distractor_color"][i],
                                            scenes["distractor_corner"][i]) if shape >= 0]


# ----------------------------------------------------------------------------------------------- render
def _coordinates():
    """Pixel centres of the supersampled canvas in [-1, 1] (x right, y down)."""
    size = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return xx, yy


def _local(xx, yy, center, radius, angle, stretch):
    """Coordinates in units of an object's radius, rotated by its angle and widened by the painters' stretch."""
    dx, dy = (xx - center[0]) / radius / stretch, (yy - center[1]) / radius
    return np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy


def _objects(scenes, i, xx, yy):
    """(mask, colour, x, y) of every object in drawing order: distractors first, the main object on top."""
    stretch = PAINTING_STRETCH if DOMAINS[scenes["domain"][i]] == "painting" else 1.0
    objects = []
    for shape, color, corner, angle in zip(scenes["distractor_shape"][i], scenes["distractor_color"][i],
                                           scenes["distractor_corner"][i], scenes["distractor_rotation"][i]):
        if shape >= 0:
            x, y = _local(xx, yy, list(CORNERS.values())[corner], DISTRACTOR_RADIUS, angle, stretch)
            objects.append((SHAPES[CLASSES[shape]](x, y), np.array(list(COLORS.values())[color]), x, y))
    center = np.array(list(POSITIONS.values())[scenes["position"][i]]) + scenes["offset"][i]
    radius = list(SIZES.values())[scenes["size"][i]] * scenes["scale"][i]
    x, y = _local(xx, yy, center, radius, scenes["rotation"][i], stretch)
    objects.append((SHAPES[CLASSES[scenes["shape"][i]]](x, y), np.array(list(COLORS.values())[scenes["color"][i]]),
                    x, y))
    return objects


def _downsample(img):
    h = img.shape[0] // SUPERSAMPLE
    return img.reshape(h, SUPERSAMPLE, h, SUPERSAMPLE, *img.shape[2:]).mean(axis=(1, 3))


def _erode(mask, width):
    out = mask.copy()
    for _ in range(width):
        out = out & np.roll(out, 1, 0) & np.roll(out, -1, 0) & np.roll(out, 1, 1) & np.roll(out, -1, 1)
    return out


def _smooth_noise(rng, cells, size):
    """Low-frequency colour noise [size, size, 3]: a cells x cells grid of random colours, upsampled."""
    grid = torch.from_numpy(rng.uniform(size=(1, 3, cells, cells)))
    smooth = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)
    return smooth[0].permute(1, 2, 0).numpy()


def _render_one(scenes, i):
    rng = np.random.default_rng(int(scenes["texture_seed"][i]))
    xx, yy = _coordinates()
    dark = BACKGROUNDS[scenes["background"][i]] == "dark"
    style = DOMAINS[scenes["domain"][i]]
    size = xx.shape[0]

    if style == "photo":
        top, bottom = (rng.uniform(0.05, 0.3, 3), rng.uniform(0.1, 0.35, 3)) if dark else \
            (rng.uniform(0.65, 0.95, 3), rng.uniform(0.55, 0.85, 3))
        t = (yy[..., None] + 1) / 2
        img = top * (1 - t) + bottom * t
        for mask, color, x, y in _objects(scenes, i, xx, yy):
            m = mask[..., None]
            light = np.clip(1.15 - 0.25 * np.hypot(x + 0.5, y + 0.5), 0.55, 1.15)[..., None]
            shadow = np.roll(np.roll(mask, 3, 0), 3, 1)[..., None] & ~m
            img = np.where(m, np.clip(color * light, 0, 1), img * np.where(shadow, 0.6, 1.0))
        img = img + rng.normal(0, 0.03, img.shape)
    elif style == "sketch":
        paper = np.array([0.18, 0.2, 0.22]) if dark else np.array([0.97, 0.96, 0.92])
        img = np.broadcast_to(paper, (size, size, 3))
        for mask, color, _, _ in _objects(scenes, i, xx, yy):
            m = mask[..., None]
            ink = color * 0.75 + (0.25 if dark else 0.0)
            outline = (mask & ~_erode(mask, 2))[..., None]
            hatch = (((xx + yy) * size / 2).astype(int) % 6 == 0)[..., None] & m
            img = np.where(outline | hatch, ink, np.where(m, paper, img))
        img = img + rng.normal(0, 0.02, img.shape)
    elif style == "cartoon":
        img = np.broadcast_to(np.array([0.1, 0.12, 0.35]) if dark else np.array([0.75, 0.92, 0.98]), (size, size, 3))
        for mask, color, x, y in _objects(scenes, i, xx, yy):
            m = mask[..., None]
            outline = (mask & ~_erode(mask, 2))[..., None]
            saturated = np.clip((color - 0.5) * 1.3 + 0.55, 0, 1)
            highlight = (np.hypot(x + 0.35, y + 0.35) < 0.18)[..., None] & m
            img = np.where(m, saturated, img)
            img = np.where(highlight, 1.0, img)
            img = np.where(outline, 0.02, img)
    else:  # painting
        img = _smooth_noise(rng, 3, size) * 0.35 + (0.05 if dark else 0.55)
        strokes = _smooth_noise(rng, 8, size) - 0.5
        for mask, color, _, _ in _objects(scenes, i, xx, yy):
            paint = np.clip(color * 0.8 + 0.1 + strokes * 0.3, 0, 1)
            soft = _blur(mask.astype(float), 1)[..., None]
            img = soft * paint + (1 - soft) * img
        img = img + rng.normal(0, 0.04, (size // 4, size // 4, 3)).repeat(4, 0).repeat(4, 1)
    return _downsample(np.clip(img, 0, 1))


def _blur(img, passes):
    for _ in range(passes):
        img = (img + np.roll(img, 1, 0) + np.roll(img, -1, 0)) / 3
        img = (img + np.roll(img, 1, 1) + np.roll(img, -1, 1)) / 3
    return img


def render(scenes):
    """Images of the scenes as a float tensor [N, 3, 32, 32] in [0, 1]."""
    images = np.stack([_render_one(scenes, i) for i in range(len(scenes["shape"]))]).astype(np.float32)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------- captions
_TEMPLATES = (
    "a {domain} of a {size} {color} {shape} {position}{others} on a {background} background.",
    "a {size} {color} {shape} {position}{others}, {domain}.",
    "{color} {shape}{others} on a {background} background.",
    "a {domain} of a {shape}{others}.",
    "a {color} {shape} {position}{others}.",
    "{domain}: {size} {shape}, {color}{others}, {background} background.",
    "a {shape} {position} in a {domain}{others}.",
    "{shape}{others}",
)


def caption(scenes, i, rng=None, noise=0.0):
    """A caption of scene i. Without rng, the full description: the main object, then " and a small {color}
    {shape} {corner}" for each distractor. With rng, web-like alt-text: a random template about one object of
    the picture, ANY one (the main object is not special to the web), and each other object mentioned or not
    by a coin flip, in a random order.

    noise is the chance that each attribute word of the named object is replaced by a wrong one: the web's
    imperfect alt-text.
    """
    words = scene_attributes(scenes, i)
    distractors = scene_distractors(scenes, i)
    if rng is None:
        others = "".join(f" and a small {d['color']} {d['shape']} {d['position']}" for d in distractors)
        return _TEMPLATES[0].format(others=others, **words)
    objects = [{k: words[k] for k in ("shape", "color", "size", "position")}, *distractors]
    order = rng.permutation(len(objects))
    named, rest = objects[order[0]], [objects[j] for j in order[1:] if rng.uniform() < 0.5]
    words.update(named)
    for name in words:
        if rng.uniform() < noise:
            words[name] = ATTRIBUTES[name][rng.integers(len(ATTRIBUTES[name]))]
    others = "".join(f" and a {o['color']} {o['shape']}" for o in rest)
    return _TEMPLATES[rng.integers(len(_TEMPLATES))].format(others=others, **words)


# ----------------------------------------------------------------------------------------------- splits
def make_split(name, domains=DOMAINS, classes=CLASSES, n_per_class=32, seed=0, distractors=BENCHMARK_DISTRACTORS,
               clutter_share=BENCHMARK_CLUTTER_SHARE):
    """A class-balanced labelled split: n_per_class images of every class in every domain.

    The downstream convention: a clutter_share of the pictures (drawn at random) have `distractors` small
    objects of other classes (of all CLASSES, not only `classes`) in their corners, and their label is the
    main object, large and in the centre. Labels index `classes` (in the order given); each item keeps its
    domain and its full caption.
    """
    _check(domains, DOMAINS, "domain")
    _check(classes, CLASSES, "class")
    if not 0 <= distractors <= MAX_DISTRACTORS:
        raise ValueError(f"distractors must be between 0 and {MAX_DISTRACTORS}; got {distractors}.")
    if not 0 <= clutter_share <= 1:
        raise ValueError(f"clutter_share is a share of the pictures, between 0 and 1; got {clutter_share}.")
    scenes = balanced_scenes(n_per_class, seed, name, domains, classes, distractors, clutter_share)
    labels = torch.tensor([list(classes).index(CLASSES[s]) for s in scenes["shape"]])
    return ImageSet(images=render(scenes), labels=labels, classnames=list(classes),
                    domains=[DOMAINS[d] for d in scenes["domain"]],
                    captions=[caption(scenes, i) for i in range(len(labels))], scenes=scenes)


def web_corpus(n, seed=0, stream="pretrain", noise=0.05, domain_shares=WEB_DOMAIN_SHARES):
    """n image-caption pairs over every domain and class, captions in varied templates with attribute noise.

    stream="pretrain" is mini-CLIP's pretraining corpus; stream="candidates" is a disjoint corpus for retrieval.
    Like the web, the corpus is dominated by photos and has few paintings (WEB_DOMAIN_SHARES), so zero-shot
    accuracy is weakest on paintings: the domain where fine-tuning has the most to gain.
    """
    return render_corpus(*web_captions(n, seed, stream, noise, domain_shares))


def web_captions(n, seed=0, stream="pretrain", noise=0.05, domain_shares=WEB_DOMAIN_SHARES):
    """The scenes and captions of web_corpus(n, ...) without the images (rendering is the slow part): retrieval
    searches captions, so only the pairs it finds need pixels (render_corpus on a subset_scenes)."""
    scenes = sample_scenes(n, seed, stream, domain_shares=domain_shares)
    rng = _rng(seed, "captions", stream)
    return scenes, [caption(scenes, i, rng, noise) for i in range(n)]


def subset_scenes(scenes, indices):
    return {name: values[np.asarray(indices)] for name, values in scenes.items()}


def render_corpus(scenes, captions):
    """An ImageSet of rendered scenes with the given captions (labels = the shape, over all CLASSES)."""
    labels = torch.from_numpy(scenes["shape"].astype(np.int64))
    return ImageSet(images=render(scenes), labels=labels, classnames=list(CLASSES),
                    domains=[DOMAINS[d] for d in scenes["domain"]], captions=list(captions), scenes=scenes)


def _check(given, known, what):
    unknown = [g for g in given if g not in known]
    if unknown or not given:
        raise ValueError(f"ShapeWorld has no {what} {unknown or '(none given)'}; choose from {list(known)}.")
