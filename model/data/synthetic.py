"""A built-in procedural PatchCamelyon-like data set (the default for every command).

Each patch is painted as two stain-concentration maps, haematoxylin (nuclei) and eosin
(stroma, cytoplasm), that are turned into RGB by Beer-Lambert absorption with stain vectors
jittered per patch. Colour therefore varies from patch to patch the way scanners and staining
runs do, and the classifier has to learn morphology: tumour cells are large, pleomorphic,
pale-vesicular nuclei with a pink cytoplasm halo, in clusters; lymphocytes are small, dark and
round. The label follows the PCam rule exactly: 1 iff the tumour mask touches the centre 32x32.

Everything is a pure function of (seed, i), so patches are reproducible in any order and in
any worker process, and nothing is cached.
"""
from __future__ import annotations

import cv2
import numpy as np

from model.data.base import CENTRE, PATCH, PCAM_CLASSES, PatchSource

DEFAULT_N = 5000  # enough that a pretrained net does not just memorise (1,600 overfit)
P_POSITIVE = 0.45  # share of positives
P_RIM = 0.30  # share of negatives whose tumour cells lie only in the rim
_LO = (PATCH - CENTRE) // 2  # centre box is [_LO, _HI) in both axes
_HI = _LO + CENTRE
_RIM_MARGIN = 3  # rim-only cells keep this many pixels away from the centre box
# Macenko reference stain vectors (optical density per R, G, B).
_H_VEC = np.array([0.5626, 0.7201, 0.4062], np.float32)
_E_VEC = np.array([0.2159, 0.8012, 0.5581], np.float32)
# Lymphoid aggregates sit on a jittered 6 px lattice so that packed nuclei stay distinct.
_GRID = np.arange(3, PATCH, 6.0)
_LATTICE = np.stack(np.meshgrid(_GRID, _GRID), -1).reshape(-1, 2)
_M64 = [np.uint64(v) for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)]


def _uniform(seed: int, i) -> np.ndarray:
    """A uniform [0, 1) number per (seed, i) from a splitmix64 hash: vectorised, so that a
    source knows all its labels up front without painting (or seeding) each patch."""
    with np.errstate(over="ignore"):
        z = (np.atleast_1d(np.asarray(i, np.uint64)) + np.uint64(1)) * _M64[0]
        z += np.uint64(seed) * _M64[1]
        z = (z ^ (z >> np.uint64(30))) * _M64[1]
        z = (z ^ (z >> np.uint64(27))) * _M64[2]
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


def _scenario(seed: int, i: int) -> str:
    """"positive" (label 1), "rim" (tumour only outside the centre) or "clear"."""
    u = float(_uniform(seed, i)[0])
    if u < P_POSITIVE:
        return "positive"
    return "rim" if (u - P_POSITIVE) / (1 - P_POSITIVE) < P_RIM else "clear"


def _smooth_noise(rng: np.random.Generator, cells: int, size: int = PATCH) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _fibres(rng: np.random.Generator, size: int = PATCH) -> np.ndarray:
    """Collagen-like streaks: a coarse noise grid stretched ~8x along a random direction.
    One inverse-mapped warpAffine does the stretch and the rotation (cheap, no big noise)."""
    grid = rng.random((size, size // 6), np.float32)  # rows: across fibres, cols: along
    ang, stretch = rng.uniform(0, np.pi), rng.uniform(6, 12)
    c, s = np.cos(ang), np.sin(ang)
    # dst (x, y) -> src (col, row): along-fibre axis compressed by `stretch`
    m = np.array([[c / stretch, s / stretch, 0], [-s, c, 0]], np.float32)
    m[:, 2] = np.array([grid.shape[1], grid.shape[0]]) / 2 - m[:, :2] @ [size / 2, size / 2]
    out = cv2.warpAffine(grid, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT)
    return (out - 0.5) * 3.5  # roughly unit variance


def _blobs(rng, centres, radii, aspect=0.25, jitter=0.2, k=14):
    """Irregular (pleomorphic) polygons around `centres`: int32 vertices [m, k, 2] in 1/4 px
    (draw with shift=2, so that small nuclei are not visibly polygonal)."""
    m = len(centres)
    ang = np.linspace(0, 2 * np.pi, k, endpoint=False)[None] + rng.uniform(0, 2 * np.pi, (m, 1))
    r = radii[:, None] * (1 + rng.uniform(-jitter, jitter, (m, k)))
    stretch = 1 + rng.uniform(0, aspect, (m, 1))  # elongation along the first vertex's axis
    rot = rng.uniform(0, 2 * np.pi, (m, 1))
    x, y = r * np.cos(ang) * stretch, r * np.sin(ang) / stretch
    px = centres[:, :1] + x * np.cos(rot) - y * np.sin(rot)
    py = centres[:, 1:] + x * np.sin(rot) + y * np.cos(rot)
    return np.round(np.stack([px, py], -1) * 4).astype(np.int32)


def _cluster(rng, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Centres [m, 2] (x, y) and nucleus radii [m] of one tumour cell cluster."""
    m = int(rng.integers(3, 16))
    radii = rng.uniform(4.0, 6.5, m)
    if where == "centre":  # cluster straddles the centre; its first cell sits inside it
        c = rng.uniform(_LO + 4, _HI - 4, 2)
    else:  # rim: cluster centre in a band near the border
        side, t = rng.integers(4), rng.uniform(0, PATCH)
        d = rng.uniform(4, _LO - 10)
        c = np.array([[d, t], [PATCH - d, t], [t, d], [t, PATCH - d]][side])
    spread = rng.uniform(6, 16)
    centres = c + rng.normal(0, spread, (m, 2))
    centres[0] = c
    return centres, radii


def _outside_centre(centres: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """True for cells whose disc of radius `reach` stays clear of the (margin-grown) centre."""
    lo, hi = _LO - _RIM_MARGIN, _HI - 1 + _RIM_MARGIN
    dx = np.maximum(np.maximum(lo - centres[:, 0], centres[:, 0] - hi), 0)
    dy = np.maximum(np.maximum(lo - centres[:, 1], centres[:, 1] - hi), 0)
    return np.hypot(dx, dy) > reach


# make_patch paints in steps that draw from one generator in a fixed order: changing the order
# of the calls below (or of the draws inside them) changes every patch of every data set.


def _stroma(rng: np.random.Generator, size: int = PATCH
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eosin with slow density changes and fibres, a little haematoxylin background, and white
    gaps (fat vacuoles, tears): (eosin, haematoxylin, tissue mask). A `size` above PATCH
    paints a larger field with the same statistics per area (slides)."""
    area = (size // PATCH) ** 2
    density = _smooth_noise(rng, 5 * size // PATCH, size)
    eos = 0.42 + 0.14 * density + rng.uniform(0.04, 0.11) * _fibres(rng, size)
    hem = 0.06 + 0.025 * density
    tissue = np.ones((size, size), np.float32)
    for _ in range(rng.integers(0, 4 * area)):
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        ax = tuple(int(v) for v in rng.integers(3, 12, 2))
        cv2.ellipse(tissue, c, ax, float(rng.uniform(0, 180)), 0, 360, 0.0, -1)
    return eos, hem, tissue


def _lymphocytes(rng: np.random.Generator, hem: np.ndarray) -> np.ndarray:
    """Small dark round nuclei, their density varying a lot between patches so that the amount
    of purple says little about the label. Half the patches also get a dense lymphoid
    aggregate, often central, so that "purple blob in the middle" is not tumour by itself.
    Impulses blurred by a Gaussian and thresholded give round discs whose radius follows each
    impulse's height."""
    size = hem.shape[0]
    if size == PATCH:
        n_lym = int(rng.integers(15, 140))
        xy = rng.uniform(0, PATCH, (n_lym, 2))
        if rng.random() < 0.5:  # aggregate: a jittered lattice keeps its nuclei distinct
            d = np.hypot(*(_LATTICE - rng.uniform(20, PATCH - 20, 2)).T) / rng.uniform(14, 30)
            keep = rng.random(len(_LATTICE)) < 0.8 * np.exp(-d * d)
            xy = np.concatenate([xy, _LATTICE[keep] + rng.uniform(-1.3, 1.3, (keep.sum(), 2))])
    else:
        xy = _field_lymphocytes(rng, size)
    xy = np.clip(xy, 0, size - 1).astype(np.intp)
    imp = np.zeros((size, size), np.float32)
    imp[xy[:, 1], xy[:, 0]] = rng.uniform(1.6, 4.0, len(xy))  # -> radius about 2..3 px
    disc = np.clip((cv2.GaussianBlur(imp, (0, 0), 1.5) * 14.15 - 0.45) * 2.5, 0, 1)
    return np.maximum(hem, disc * rng.uniform(1.1, 1.5))


def _field_lymphocytes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Lymphocyte centres over a field larger than a patch: the per-patch density range of
    `_lymphocytes`, varying smoothly across the field, and aggregates at the per-patch rate."""
    area = (size / PATCH) ** 2
    density = 15 + 125 * (0.5 + 0.5 * _smooth_noise(rng, max(2, size // 192), size))
    cand = rng.uniform(0, size, (int(140 * area), 2))
    keep = rng.random(len(cand)) < density[cand[:, 1].astype(int), cand[:, 0].astype(int)] / 140
    pts = [cand[keep]]
    grid = np.arange(3, size, 6.0)
    lattice = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    for _ in range(rng.poisson(0.5 * area)):
        d = np.hypot(*(lattice - rng.uniform(20, size - 20, 2)).T) / rng.uniform(14, 30)
        near = d < 3
        keep = rng.random(int(near.sum())) < 0.8 * np.exp(-d[near] ** 2)
        pts.append(lattice[near][keep] + rng.uniform(-1.3, 1.3, (int(keep.sum()), 2)))
    return np.concatenate(pts)


def _tumour_clusters(rng: np.random.Generator, scenario: str) -> list:
    """Clusters of tumour cells: one touching the centre for a positive patch (sometimes a
    second in the rim), only rim clusters for a rim-only negative."""
    clusters = []
    if scenario == "positive":
        clusters.append(_cluster(rng, "centre"))  # its first nucleus covers a centre pixel
        if rng.random() < 0.3:
            clusters.append(_cluster(rng, "rim"))
    elif scenario == "rim":
        for _ in range(rng.integers(1, 3)):
            clusters.append(_cluster(rng, "rim"))
    return clusters


def _tumour_cells(rng: np.random.Generator, scenario: str, clusters: list, eos: np.ndarray,
                  hem: np.ndarray, tissue: np.ndarray):
    """Pleomorphic pale nuclei with a cytoplasm halo and prominent nucleoli, painted over the
    stroma: (tumour mask, eosin, haematoxylin, tissue)."""
    size = hem.shape[0]
    mask = np.zeros((size, size), np.uint8)
    if not clusters:
        return mask, eos, hem, tissue
    centres = np.concatenate([c for c, _ in clusters])
    radii = np.concatenate([r for _, r in clusters])
    halo = radii * rng.uniform(1.3, 1.6, len(radii))
    if scenario == "rim":  # keep whole cells strictly outside the centre box: polygon
        # vertices reach at most 1.15 * 1.25 * halo (jitter, stretch), well under 1.6
        keep = _outside_centre(centres, halo * 1.6 + 2)
        if not keep.any():  # rare: every cell strayed inwards; one corner cell instead
            centres, halo, radii, keep = (np.array([[8.0, 8.0]]), np.array([6.0]),
                                          np.array([4.5]), np.array([True]))
        centres, radii, halo = centres[keep], radii[keep], halo[keep]
    cyto = _blobs(rng, centres, halo, jitter=0.15)
    nuc = _blobs(rng, centres, radii)
    cv2.fillPoly(mask, list(cyto), 1, shift=2)
    cv2.fillPoly(mask, list(nuc), 1, shift=2)
    body = mask.astype(np.float32)
    eos = eos * (1 - body) + body * rng.uniform(0.25, 0.4)  # paler, smoother cytoplasm
    hem = hem * (1 - body) + body * 0.10
    tissue = np.maximum(tissue, body)
    nuclei = np.zeros_like(hem)
    has_nucleolus = rng.random(len(nuc)) < 0.6
    for k, (poly, dark) in enumerate(zip(nuc, rng.uniform(0.4, 0.8, len(nuc)))):
        cv2.fillPoly(nuclei, [poly], float(dark), cv2.LINE_AA, shift=2)
        cv2.polylines(nuclei, [poly], True, float(dark) + 0.5, 1, cv2.LINE_AA, shift=2)
        if has_nucleolus[k]:  # prominent nucleolus, a hallmark of malignancy
            off = rng.normal(0, 1.0, 2)
            cv2.circle(nuclei, tuple(int(v) for v in (centres[k] + off) * 4), 5,
                       float(dark) + 0.9, -1, cv2.LINE_AA, shift=2)
    # vesicular chromatin: coarse clumps inside the pale nucleus
    chrom = 0.7 + 0.6 * cv2.resize(rng.random((size // 2, size // 2), np.float32),
                                   (size, size), interpolation=cv2.INTER_LINEAR)
    return mask, eos, np.maximum(hem, nuclei * chrom), tissue


def _optics(rng: np.random.Generator, hem: np.ndarray, eos: np.ndarray, tissue: np.ndarray,
            stain: tuple | None = None) -> np.ndarray:
    """Slight blur, per-patch stain jitter, Beer-Lambert, sensor noise: uint8 RGB. One
    cv2.transform maps the (H, E) concentrations to log-intensity per RGB channel. `stain`
    (h_vec, e_vec, brightness) replaces the drawn jitter (one stain across a slide)."""
    stains = cv2.merge([hem * tissue, np.clip(eos, 0.05, None) * tissue])
    stains = cv2.GaussianBlur(stains, (0, 0), rng.uniform(0.6, 1.0))
    h_vec = np.clip(_H_VEC + rng.normal(0, 0.06, 3), 0.05, None) * rng.uniform(0.7, 1.3)
    e_vec = np.clip(_E_VEC + rng.normal(0, 0.05, 3), 0.05, None) * rng.uniform(0.7, 1.4)
    brightness = np.log(255.0 * rng.uniform(0.88, 1.0))
    if stain is not None:
        h_vec, e_vec, brightness = stain
    rgb = cv2.exp(cv2.transform(stains, np.c_[-h_vec, -e_vec, np.full(3, brightness)]))
    # sensor noise, shared by the channels (one draw per pixel keeps it cheap)
    rgb += (rng.random((*hem.shape, 1), np.float32) - 0.5) * rng.uniform(6, 14)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def make_patch(seed: int, i: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Paint patch `i` of set `seed`: (uint8 RGB [96,96,3], bool tumour mask [96,96], label)."""
    rng = np.random.default_rng([seed, i])
    scenario = _scenario(seed, i)
    eos, hem, tissue = _stroma(rng)
    hem = _lymphocytes(rng, hem)
    clusters = _tumour_clusters(rng, scenario)
    mask, eos, hem, tissue = _tumour_cells(rng, scenario, clusters, eos, hem, tissue)
    image = _optics(rng, hem, eos, tissue)
    mask = mask.astype(bool)
    return image, mask, int(mask[_LO:_HI, _LO:_HI].any())


def slide_stain(rng: np.random.Generator) -> tuple:
    """One stain (h_vec, e_vec, brightness) for a whole synthetic slide, jittered like a
    patch's."""
    h_vec = np.clip(_H_VEC + rng.normal(0, 0.04, 3), 0.05, None) * rng.uniform(0.85, 1.15)
    e_vec = np.clip(_E_VEC + rng.normal(0, 0.03, 3), 0.05, None) * rng.uniform(0.85, 1.2)
    return h_vec, e_vec, np.log(255.0 * rng.uniform(0.92, 0.98))


def paint_field(rng: np.random.Generator, size: int, tumour_at: np.ndarray, stain: tuple
                ) -> tuple[np.ndarray, np.ndarray]:
    """A square field of `size` px (a multiple of PATCH) painted like the patches, with one
    tumour cell cluster around each (x, y) of `tumour_at`, for whole synthetic slides:
    (uint8 RGB [size, size, 3], bool tumour mask). Same steps and statistics per area as
    `make_patch`, so a 96 px window of a field looks like a patch to a model trained on
    them, without the seams a mosaic of patches has."""
    eos, hem, tissue = _stroma(rng, size)
    hem = _lymphocytes(rng, hem)
    clusters = []
    for c in np.asarray(tumour_at, np.float64).reshape(-1, 2):
        m = int(rng.integers(3, 16))
        centres = c + rng.normal(0, rng.uniform(6, 16), (m, 2))
        centres[0] = c
        clusters.append((centres, rng.uniform(4.0, 6.5, m)))
    mask, eos, hem, tissue = _tumour_cells(rng, "positive", clusters, eos, hem, tissue)
    return _optics(rng, hem, eos, tissue, stain), mask.astype(bool)


class SyntheticSource(PatchSource):
    """`n` procedural PCam-like patches of set `seed` (labels known without painting)."""

    def __init__(self, n: int | None = None, seed: int = 0):
        n = DEFAULT_N if n is None else int(n)
        seed = int(seed)
        labels = (_uniform(seed, np.arange(n)) < P_POSITIVE).astype(np.int64)
        super().__init__(kind="synthetic", root=None,
                         ids=[f"synth-{seed}-{i:05d}" for i in range(n)], labels=labels,
                         classes=list(PCAM_CLASSES), split="train", synthetic=True)
        self.seed = seed

    def read(self, i: int) -> np.ndarray:
        return make_patch(self.seed, int(i))[0]

    def mask(self, i: int) -> np.ndarray:
        """Ground-truth tumour pixels of patch `i` (bool [96, 96])."""
        return make_patch(self.seed, int(i))[1]

    def describe(self) -> dict:
        d = super().describe()
        d["seed"] = self.seed
        return d

    def describe_short(self) -> str:
        return (f"built-in SYNTHETIC PCam-like set (seed {self.seed}, {len(self)} patches, "
                f"{int(self.labels.sum())} tumour)")

