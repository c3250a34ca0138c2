"""ShapeWorld: a procedural image-text world with domains, base/new classes and rich captions.

Every image is a scene: one shape (the class) with a colour, a size, a position and a background tone,
rendered in one of four styles (the domains). Scenes, images and captions are a pure function of the seed,
so every split is reproducible and two splits with different names never share a scene.

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
def sample_scenes(n, seed, stream, domains=DOMAINS, classes=CLASSES, domain_shares=None):
    """n random scenes, classes drawn uniformly, domains by domain_shares (uniform if None): numpy arrays.

    Attributes are indices into ATTRIBUTES; jitter (rotation, offset, scale) and a per-scene seed for texture
    are continuous, so no two scenes of different streams coincide.
    """
    rng = _rng(seed, "scenes", stream)
    shape = np.array([CLASSES.index(c) for c in classes])[rng.integers(len(classes), size=n)]
    domain = np.array([DOMAINS.index(d) for d in domains])[rng.choice(len(domains), size=n, p=domain_shares)]
    return _scenes(rng, shape, domain)


def _scenes(rng, shape, domain):
    n = len(shape)
    return {
        "shape": shape, "domain": domain,
        "color": rng.integers(len(COLORS), size=n), "size": rng.integers(len(SIZES), size=n),
        "position": rng.integers(len(POSITIONS), size=n), "background": rng.integers(len(BACKGROUNDS), size=n),
        "rotation": rng.uniform(-0.2, 0.2, size=n), "offset": rng.uniform(-0.07, 0.07, size=(n, 2)),
        "scale": rng.uniform(0.9, 1.1, size=n), "texture_seed": rng.integers(2 ** 31, size=n),
    }


def balanced_scenes(n_per_class, seed, stream, domains=DOMAINS, classes=CLASSES):
    """n_per_class scenes for every (domain, class) pair, in a fixed order."""
    rng = _rng(seed, "balanced", stream)
    grid = [(DOMAINS.index(d), CLASSES.index(c)) for d in domains for c in classes for _ in range(n_per_class)]
    domain, shape = (np.array(v) for v in zip(*grid))
    return _scenes(rng, shape, domain)


def scene_attributes(scenes, i):
    """The words describing scene i: {"shape": "star", "color": "red", ...}."""
    return {name: values[scenes[name][i]] for name, values in ATTRIBUTES.items()}


# ----------------------------------------------------------------------------------------------- render
def _grid(scene_i, scenes):
    size = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = np.array(list(POSITIONS.values())[scenes["position"][scene_i]]) + scenes["offset"][scene_i]
    radius = list(SIZES.values())[scenes["size"][scene_i]] * scenes["scale"][scene_i]
    angle = scenes["rotation"][scene_i]
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    if DOMAINS[scenes["domain"][scene_i]] == "painting":
        dx = dx / PAINTING_STRETCH
    x = np.cos(angle) * dx + np.sin(angle) * dy
    y = -np.sin(angle) * dx + np.cos(angle) * dy
    return x, y, xx, yy


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
    x, y, xx, yy = _grid(i, scenes)
    mask = SHAPES[CLASSES[scenes["shape"][i]]](x, y)
    color = np.array(list(COLORS.values())[scenes["color"][i]])
    dark = BACKGROUNDS[scenes["background"][i]] == "dark"
    style = DOMAINS[scenes["domain"][i]]
    size = mask.shape[0]
    m = mask[..., None]

    if style == "photo":
        top, bottom = (rng.uniform(0.05, 0.3, 3), rng.uniform(0.1, 0.35, 3)) if dark else \
            (rng.uniform(0.65, 0.95, 3), rng.uniform(0.55, 0.85, 3))
        t = (yy[..., None] + 1) / 2
        background = top * (1 - t) + bottom * t
        light = np.clip(1.15 - 0.25 * np.hypot(x + 0.5, y + 0.5), 0.55, 1.15)[..., None]
        shadow = _erode(np.roll(np.roll(mask, 3, 0), 3, 1), 0)[..., None] & ~m
        img = np.where(m, np.clip(color * light, 0, 1), background * np.where(shadow, 0.6, 1.0))
        img = img + rng.normal(0, 0.03, img.shape)
    elif style == "sketch":
        paper = np.array([0.18, 0.2, 0.22]) if dark else np.array([0.97, 0.96, 0.92])
        ink = color * 0.75 + (0.25 if dark else 0.0)
        outline = (mask & ~_erode(mask, 2))[..., None]
        hatch = (((xx + yy) * size / 2).astype(int) % 6 == 0)[..., None] & m
        img = np.where(outline | hatch, ink, paper)
        img = img + rng.normal(0, 0.02, img.shape)
    elif style == "cartoon":
        background = np.array([0.1, 0.12, 0.35]) if dark else np.array([0.75, 0.92, 0.98])
        outline = (mask & ~_erode(mask, 2))[..., None]
        saturated = np.clip((color - 0.5) * 1.3 + 0.55, 0, 1)
        highlight = (np.hypot(x + 0.35, y + 0.35) < 0.18)[..., None] & m
        img = np.where(m, saturated, background)
        img = np.where(highlight, 1.0, img)
        img = np.where(outline, 0.02, img)
    else:  # painting
        canvas = _smooth_noise(rng, 3, size) * 0.35 + (0.05 if dark else 0.55)
        strokes = _smooth_noise(rng, 8, size) - 0.5
        paint = np.clip(color * 0.8 + 0.1 + strokes * 0.3, 0, 1)
        soft = _blur(mask.astype(float), 1)[..., None]
        img = soft * paint + (1 - soft) * canvas
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
    "a {domain} of a {size} {color} {shape} {position} on a {background} background.",
    "a {size} {color} {shape} {position}, {domain}.",
    "{color} {shape} on a {background} background.",
    "a {domain} of a {shape}.",
    "a {color} {shape} {position}.",
    "{domain}: {size} {shape}, {color}, {background} background.",
    "a {shape} {position} in a {domain}.",
    "{shape}",
)


def caption(scenes, i, rng=None, noise=0.0):
    """A caption of scene i. With rng, a random template (web-like variety); without, the full description.

    noise is the chance that each attribute word is replaced by a wrong one: the web's imperfect alt-text.
    """
    words = scene_attributes(scenes, i)
    if rng is None:
        return _TEMPLATES[0].format(**words)
    for name in words:
        if rng.uniform() < noise:
            words[name] = ATTRIBUTES[name][rng.integers(len(ATTRIBUTES[name]))]
    return _TEMPLATES[rng.integers(len(_TEMPLATES))].format(**words)


# ----------------------------------------------------------------------------------------------- splits
def make_split(name, domains=DOMAINS, classes=CLASSES, n_per_class=32, seed=0):
    """A class-balanced labelled split: n_per_class images of every class in every domain.

    Labels index `classes` (in the order given); each item keeps its domain and its full caption.
    """
    _check(domains, DOMAINS, "domain")
    _check(classes, CLASSES, "class")
    scenes = balanced_scenes(n_per_class, seed, name, domains, classes)
    labels = torch.tensor([list(classes).index(CLASSES[s]) for s in scenes["shape"]])
    return ImageSet(images=render(scenes), labels=labels, classnames=list(classes),
                    domains=[DOMAINS[d] for d in scenes["domain"]],
                    captions=[caption(scenes, i) for i in range(len(labels))], scenes=scenes)


def web_corpus(n, seed=0, stream="pretrain", noise=0.1, domain_shares=WEB_DOMAIN_SHARES):
    """n image-caption pairs over every domain and class, captions in varied templates with attribute noise.

    stream="pretrain" is mini-CLIP's pretraining corpus; stream="candidates" is a disjoint corpus for retrieval.
    Like the web, the corpus is dominated by photos and has few paintings (WEB_DOMAIN_SHARES), so zero-shot
    accuracy is weakest on paintings: the domain where fine-tuning has the most to gain.
    """
    return render_corpus(*web_captions(n, seed, stream, noise, domain_shares))


def web_captions(n, seed=0, stream="pretrain", noise=0.1, domain_shares=WEB_DOMAIN_SHARES):
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
