"""SyntheticAerial: procedurally drawn, long-tailed nadir views of a suburb.

A top-down camera (no perspective) looks at a road network with rows of lots, roofs, yards,
trees, sometimes a lake or river, and small objects: cars, swimming pools, boats and solar
panels. Each image has its own layout rotation and ground-sample distance. Colours are shared
across classes on purpose (roof paints equal road greys and bare-ground browns, solar panels are
as dark as asphalt, pools as cyan as shallow water, tree and grass greens overlap, car and boat
paints equal roof paints), so a pixel is decided by shape and surroundings, not colour alone.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np

from medoe.data.generated import GeneratedScenes, generator_main
from medoe.data.synthetic import _photometric

CLASS_NAMES = [
    "bare ground",
    "grass",
    "road",
    "building",
    "tree",
    "water",
    "car",
    "swimming pool",
    "boat",
    "solar panel",
]
PALETTE = [
    (150, 130, 100),
    (100, 180, 70),
    (128, 64, 128),
    (220, 60, 40),
    (40, 110, 40),
    (40, 90, 200),
    (250, 210, 0),
    (0, 220, 220),
    (255, 120, 200),
    (120, 0, 160),
]
BARE, GRASS, ROAD, BUILDING, TREE, WATER, CAR, POOL, BOAT, SOLAR = range(len(CLASS_NAMES))

_ASPHALT, _CONCRETE, _SOIL = (85, 85, 88), (150, 150, 145), (150, 130, 100)
_ROOFS = np.array([_ASPHALT, _CONCRETE, _SOIL, (165, 85, 60), (215, 215, 210), (50, 55, 62)], np.float64)
_PAINTS = np.vstack([_ROOFS, [(180, 30, 35), (30, 60, 165), (35, 35, 40)]])  # cars and boats
_GRASS, _LEAVES = (100, 140, 70), (65, 105, 50)  # with spreads of 25 and 22 the two ranges overlap
_WATERS = [(40, 70, 110), (45, 105, 125), (75, 150, 165)]  # the last is close to pool cyan
_POOL, _SOLAR = (60, 185, 205), (45, 50, 66)  # solar panels sit between asphalt and slate roofs
_PROBE = np.stack(np.meshgrid([0, 0.5, 1], [0, 0.5, 1]), -1).reshape(-1, 2)  # corners, mids, centre
_HULL = np.array([[-0.5, -0.18], [0.2, -0.18], [0.5, 0], [0.2, 0.18], [-0.5, 0.18]])  # per metre of boat
# Lookup tables of the classes that forbid a placement.
_LOT_BLOCKERS, _HOUSE_BLOCKERS, _TREE_BLOCKERS = (
    np.isin(np.arange(256), c) for c in ([ROAD, WATER], [ROAD, WATER, BUILDING], [ROAD, BUILDING, WATER, POOL])
)
_DRY = np.arange(256) != WATER


def _tones(rng, bases, spread=12.0, count=None):
    # _tone for many colours in one draw: a shared brightness shift plus a small per-channel tint.
    bases = np.asarray(bases, np.float64).reshape(-1, 3) if count is None else np.tile(bases, (count, 1))
    e = rng.standard_normal((len(bases), 4))
    return np.clip(bases + e[:, :1] * (spread * 0.6) + 6.0 * e[:, 1:], 0, 255)


def _perp(u):
    return np.stack([-u[..., 1], u[..., 0]], -1)


def _frame(o, u, n, a, b):  # local (along u, across n) metres to world: o, u, n (N, 2); a, b (N, k)
    return o[:, None] + a[..., None] * u[:, None] + b[..., None] * n[:, None]


def _box(o, u, n, a0, a1, b0, b1):  # N local rectangles as (N, 4, 2) world points
    return _frame(o, u, n, np.stack([a0, a1, a1, a0], 1), np.stack([b0, b0, b1, b1], 1))


def _rounded(o, u, n, a0, a1, b0, b1, r):  # cut corners make pools read as pools, not tiny roofs
    a = np.stack([a0 + r, a1 - r, a1, a1, a1 - r, a0 + r, a0, a0], 1)
    return _frame(o, u, n, a, np.stack([b0, b0, b0 + r, b1 - r, b1, b1, b1 - r, b0 + r], 1))


def _star(rng, radius, count):  # a lumpy outline for lakes and fields, in metres around (0, 0)
    angles, radii = np.sort(rng.uniform(0, 2 * np.pi, count)), radius * rng.uniform(0.6, 1.0, count)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)


class _Canvas:
    """Draws into the label and, when wanted, the image and a shadow mask, in fixed-point pixels.

    World metres map to pixels by one similarity (rotation, scale, shift) and OpenCV gets 3
    fractional bits, so that cars and panels keep their sub-pixel size.
    """

    def __init__(self, height, width, with_image, scale, angle, shadow, darkness):
        self.lab = np.zeros((height, width), np.uint8)
        self.img = np.empty((height, width, 3), np.uint8) if with_image else None
        self.shade = np.zeros((height, width), np.uint8) if with_image else None
        c, s = np.cos(angle), np.sin(angle)
        self.m, self.t = 8 * scale * np.array([[c, s], [-s, c]]), 4 * np.array([width, height])
        self.inv = np.array([[c, -s], [s, c]]) / (8 * scale)  # closed form: LAPACK is slow at this size
        self.shadow = 8 * scale * np.asarray(shadow)  # fixed-point offset per metre of height
        away = self.shadow @ self.inv
        self.toward_sun = -away / np.linalg.norm(away)  # unit vector in world axes
        self.scale8, self.w, self.h, self.dark = 8 * scale, width, height, int(255 * darkness)

    def sample(self, rng, count):  # world points uniform over the image
        return (rng.random((count, 2)) * 8 * np.array([self.w, self.h]) - self.t) @ self.inv

    def visible(self, pts, margin):  # within margin metres of the image: skips most off-image work
        p, g = np.asarray(pts) @ self.m + self.t, margin * self.scale8
        return (p[:, 0] > -g) & (p[:, 0] < 8 * self.w + g) & (p[:, 1] > -g) & (p[:, 1] < 8 * self.h + g)

    def fix(self, pts):
        return np.round(np.clip(np.asarray(pts) @ self.m + self.t, -8e4, 8e4)).astype(np.int32)

    def poly(self, fixed, color, cls, tall=0.0):  # fixed (n, 2) or a list of them; cls None: image only
        fixed = fixed if isinstance(fixed, list) else [fixed]
        if cls is not None:
            cv2.fillPoly(self.lab, fixed, cls, cv2.LINE_8, 3)
        if self.img is not None:
            if tall > 0:  # drop shadow: the footprint swept away from the sun, cleared under the roof
                off = np.round(self.shadow * tall).astype(np.int32)
                hulls = [cv2.convexHull(np.vstack([f, f + off])) for f in fixed]
                cv2.fillPoly(self.shade, hulls, self.dark, cv2.LINE_8, 3)
                cv2.fillPoly(self.shade, fixed, 0, cv2.LINE_8, 3)
            cv2.fillPoly(self.img, fixed, color, cv2.LINE_8, 3)

    def circle(self, centre, radius, color, cls, cast=None):  # fixed-point [u, v]; cast: shadow centre
        if cls is not None:
            cv2.circle(self.lab, centre, radius, cls, -1, cv2.LINE_8, 3)
        if self.img is not None:
            if cast is not None:  # not cleared under the crown: neighbouring crowns shade each other
                cv2.circle(self.shade, cast, radius, self.dark, -1, cv2.LINE_8, 3)
            cv2.circle(self.img, centre, radius, color, -1, cv2.LINE_8, 3)

    def hit(self, fixed, lut):  # any probe point on a class in lut, over the last point axis
        # Placement tests read the label only, so label-only rendering makes the same choices.
        u = np.clip((fixed[..., 0] + 4) >> 3, 0, self.w - 1)
        return lut[self.lab[np.clip((fixed[..., 1] + 4) >> 3, 0, self.h - 1), u]].any(-1)


def _roads(cv, rng, reach):
    """Parallel streets and up to two crossing ones, each of two slightly bent segments."""
    spacing = rng.uniform(50, 90)
    offsets = np.arange(-reach + rng.uniform(0, spacing), reach, spacing)
    crossing = rng.uniform(-0.8 * reach, 0.8 * reach, rng.integers(0, 3))
    d, count = np.r_[offsets, crossing], offsets.size + crossing.size
    phi = np.r_[np.zeros(offsets.size), np.full(crossing.size, np.pi / 2)] + rng.normal(0, 0.08, count)
    u, ends = np.stack([np.cos(phi), np.sin(phi)], -1), np.full(count, 1.5 * reach)
    along = np.stack([-ends, rng.uniform(-0.5, 0.5, count) * reach, ends], 1)
    verts = _frame(np.zeros((count, 2)), u, _perp(u), along, d[:, None] + [0, 1, 0] * rng.normal(0, 5, (count, 1)))
    width = rng.uniform(5.5, 11.0, count)
    colors = _tones(rng, np.where((rng.random(count) < 0.2)[:, None], _CONCRETE, _ASPHALT), 20).tolist()
    paint = _tones(rng, (230, 230, 220), 10, count).tolist()
    p, q = verts[:, :-1].reshape(-1, 2), verts[:, 1:].reshape(-1, 2)
    length = np.linalg.norm(q - p, axis=1)
    u, w = (q - p) / length[:, None], np.repeat(width, 2)
    quads = cv.fix(_box(p, u, _perp(u), 0 * length, length, -w / 2, w / 2))
    joints, radii = cv.fix(verts[:, 1]).tolist(), np.round(width * cv.scale8 / 2).astype(int).tolist()
    for k in range(count):
        cv.poly([quads[2 * k], quads[2 * k + 1]], colors[k], ROAD)
        cv.circle(joints[k], radii[k], colors[k], ROAD)
        for j in (2 * k, 2 * k + 1) if cv.img is not None and width[k] > 8 else ():  # centre dashes: still road
            a = np.arange(1.0, length[j], 9.0)[:, None] + [0, 3, 3, 0]
            dash = p[j] + a[..., None] * u[j] + np.array([[-0.1], [-0.1], [0.1], [0.1]]) * _perp(u[j])
            cv.poly(list(cv.fix(dash)), paint[k], None)
    return p, u, length, w


def _lots(cv, rng, segments):
    """Rows of lots along both sides of every road segment, kept where no road or water is."""
    p, u, length, width = (np.repeat(x, 2, 0) for x in segments)  # each segment twice: both sides
    rows, count = len(p), int(length.max() / 12) + 2
    widths = rng.uniform(12, 22, (rows, count))
    a1 = (rng.uniform(0, 8, (rows, 1)) + np.cumsum(widths, 1)).ravel()
    b0 = width / 2 + rng.uniform(1, 3, rows)
    b1, r = b0 + rng.uniform(22, 34, rows), rng.random((rows * count, 28))
    row = np.repeat(np.arange(rows), count)
    n = np.where(row[:, None] % 2 == 0, 1.0, -1.0) * _perp(u[row])
    o, u, a0, b0, b1 = p[row], u[row], a1 - widths.ravel(), b0[row], b1[row]
    centre = o + ((a0 + a1) / 2)[:, None] * u + ((b0 + b1) / 2)[:, None] * n
    keep = (a1 <= length[row]) & (r[:, 0] >= 0.1) & cv.visible(centre, 25)
    o, u, n, a0, a1, b0, b1, r = (x[keep] for x in (o, u, n, a0, a1, b0, b1, r))
    probe = _frame(
        o, u, n, a0[:, None] + (a1 - a0)[:, None] * _PROBE[:, 0], b0[:, None] + (b1 - b0)[:, None] * _PROBE[:, 1]
    )
    keep = ~cv.hit(cv.fix(probe), _LOT_BLOCKERS)
    return o[keep], u[keep], n[keep], (a0[keep], a1[keep], b0[keep], b1[keep]), r[keep]


def _houses(cv, rng, lots, pool_rate, solar_rate):
    """Yards, then per lot a driveway, a pool, the roof and its solar panels.

    Returns the parked cars (centres, headings) and spots for back-yard trees.
    """
    o, u, n, (a0, a1, b0, b1), r = lots
    count, grass = len(r), r[:, 1] < 0.7
    yard = np.where(grass[:, None], _tones(rng, _GRASS, 25, count), _tones(rng, _SOIL, 20, count)).tolist()
    for k, quad in enumerate(cv.fix(_box(o, u, n, a0, a1, b0, b1))):  # all yards first: none covers a roof
        cv.poly(quad, yard[k], GRASS if grass[k] else BARE)
    front, bw = b0 + 3 + 5 * r[:, 2], (0.5 + 0.35 * r[:, 3]) * (a1 - a0)
    bd = np.minimum(9 + 6 * r[:, 4], b1 - front - 3)
    ba0 = a0 + (a1 - a0 - bw) * r[:, 5]
    ba1, back = ba0 + bw, front + bd
    probe = cv.fix(
        _frame(o, u, n, ba0[:, None] + bw[:, None] * _PROBE[:, 0], front[:, None] + bd[:, None] * _PROBE[:, 1])
    )
    house, ridges = cv.fix(_box(o, u, n, ba0, ba1, front, back)), cv.fix(_box(o, u, n, ba0, ba1, back - bd / 2, back))
    roof = _tones(rng, _ROOFS[(r[:, 6] * len(_ROOFS)).astype(int)], 14)
    ridge, roof, tall = (0.82 * roof).tolist(), roof.tolist(), 3 + 4 * r[:, 7]
    pl, pw = 5 + 4 * r[:, 8], 3 + 1.5 * r[:, 9]
    pa, pb = a0 + 2 + (a1 - a0 - 12) * r[:, 10], back + 1.5 + (b1 - back - pw - 3) * r[:, 11]
    has_pool = (r[:, 12] < pool_rate) & (b1 - back > pw + 3)
    decks = cv.fix(_box(o, u, n, pa - 1, pa + pl + 1, pb - 1, pb + pw + 1))
    pools = cv.fix(_rounded(o, u, n, pa, pa + pl, pb, pb + pw, 1.0))
    deck, water = _tones(rng, _CONCRETE, 15, count).tolist(), _tones(rng, _POOL, 18, count).tolist()
    wa = np.where(r[:, 13] < 0.5, ba0, ba0 + 0.55 * bw)  # an L-shaped house: a wing into the back yard
    wings, has_wing = cv.fix(_box(o, u, n, wa, wa + 0.45 * bw, back - 1, back + 4 + 4 * r[:, 14])), r[:, 15] < 0.35
    da = ba0 + (bw - 3.5) * r[:, 16]
    drives, has_drive = cv.fix(_box(o, u, n, da, da + 3.5, b0 - 2.5, front)), r[:, 17] < 0.75
    pave = _tones(rng, np.where((r[:, 18] < 0.5)[:, None], _ASPHALT, _CONCRETE), 15).tolist()
    parked, spaces = _frame(o, u, n, (da + 1.75)[:, None], front[:, None] - [3.0, 8.2]), (r[:, 22] * 2.4).astype(int)
    rows = np.minimum(1 + (3 * r[:, 19]).astype(int), (bd / 2 - 0.8) // 1.9).astype(int)
    cols = np.minimum(2 + (5 * r[:, 20]).astype(int), (bw - 1) // 1.2).astype(int)
    has_solar, solar = (r[:, 21] < solar_rate) & (rows > 0) & (cols > 0), _tones(rng, _SOLAR, 8, count).tolist()
    built = np.zeros(count, bool)
    for k in range(count):
        if bd[k] < 6 or cv.hit(probe[k], _HOUSE_BLOCKERS):
            continue
        built[k] = True
        if has_drive[k]:
            cv.poly(drives[k], pave[k], ROAD)  # driveways are road for the labels
        if has_pool[k]:
            cv.poly(decks[k], deck[k], BARE)
            cv.poly(pools[k], water[k], POOL)
        cv.poly([house[k], wings[k]] if has_wing[k] and not has_pool[k] else house[k], roof[k], BUILDING, tall[k])
        if cv.img is not None:
            cv.poly(ridges[k], ridge[k], None)  # the far roof half in shade; image only
        if has_solar[k]:  # an array of panels on the near roof half, drawn after the roof
            j, i = np.divmod(np.arange(rows[k] * cols[k]), cols[k])
            a = ba0[k] + 0.5 + (bw[k] - 1 - 1.2 * cols[k]) * r[k, 23] + 1.2 * i[:, None] + [0, 1, 1, 0]
            b = front[k] + 0.6 + 1.9 * j[:, None] + [0, 0, 1.7, 1.7]
            cv.poly(list(cv.fix(o[k] + a[..., None] * u[k] + b[..., None] * n[k])), solar[k], SOLAR)
    slots = np.arange(2) < np.where(built & has_drive, spaces, 0)[:, None]
    spots = o + (a0 + (a1 - a0) * r[:, 24])[:, None] * u + (b1 - 1 - 4 * r[:, 25])[:, None] * n
    return parked[slots], np.repeat(n, 2, 0)[slots.ravel()], spots[built & (r[:, 26] < 0.6)]


def _cars(cv, rng, centres, heads):
    """Oriented boxes with dark windows (image only, still car); paints shared with the roofs."""
    m, side = len(centres), _perp(heads)
    length, half = rng.uniform(4.0, 4.9, m), rng.uniform(0.85, 0.97, m)
    paint = _tones(rng, _PAINTS[rng.integers(len(_PAINTS), size=m)], 12).tolist()
    glass = _tones(rng, (30, 35, 45), 8, m).tolist()
    body = cv.fix(_box(centres, heads, side, -length / 2, length / 2, -half, half))
    front = cv.fix(_box(centres, heads, side, 0.05 * length, 0.28 * length, -0.8 * half, 0.8 * half))
    rear = cv.fix(_box(centres, heads, side, -0.4 * length, -0.28 * length, -0.8 * half, 0.8 * half))
    for k in range(m):
        cv.poly(body[k], paint[k], CAR)
        if cv.img is not None:
            cv.poly([front[k], rear[k]], glass[k], None)


def _trees(cv, rng, centres, spread, blobs):
    """Clusters of overlapping crowns with a lit side towards the sun: a texture grass lacks."""
    blobs = blobs * ~cv.hit(cv.fix(centres)[:, None], _TREE_BLOCKERS)  # trees never block trees: one test
    total = int(blobs.sum())
    xy = np.repeat(centres, blobs, 0) + rng.standard_normal((total, 2)) * np.repeat(spread, blobs)[:, None]
    radius, tall = rng.uniform(1.5, 3.8, total), rng.uniform(4, 10, total)
    dark = _tones(rng, _LEAVES, 22, total)
    lit, dark = np.minimum(255, dark * 1.25 + 8).tolist(), dark.tolist()
    c = cv.fix(xy)
    cast = (c + np.round(tall[:, None] * cv.shadow).astype(np.int32)).tolist()
    hl, c = cv.fix(xy + 0.3 * radius[:, None] * cv.toward_sun).tolist(), c.tolist()
    rc, rl = (np.round(f * radius * cv.scale8).astype(int).tolist() for f in (1.0, 0.55))
    for k in range(total):
        cv.circle(c[k], rc[k], dark[k], TREE, cast[k])
        if cv.img is not None:
            cv.circle(hl[k], rl[k], lit[k], None)


def _boats(cv, rng, anchors, spread):
    m = len(anchors)
    centres = anchors + rng.standard_normal((m, 2)) * spread
    heading, length = rng.uniform(0, 2 * np.pi, m), rng.uniform(4, 11, m)
    u = np.stack([np.cos(heading), np.sin(heading)], -1)
    hulls = cv.fix(_frame(centres, u, _perp(u), _HULL[:, 0] * length[:, None], _HULL[:, 1] * length[:, None]))
    cabins = cv.fix(_box(centres, u, _perp(u), -0.3 * length, 0 * length, -0.1 * length, 0.1 * length))
    paint = _tones(rng, _PAINTS[rng.integers(len(_PAINTS), size=m)], 12).tolist()
    white = _tones(rng, (215, 215, 210), 15, m).tolist()
    for k in range(m):
        if not cv.hit(np.vstack([hulls[k], cabins[k]]), _DRY):  # wholly on open water, clear of boats
            cv.poly(hulls[k], paint[k], BOAT)
            if cv.img is not None:
                cv.poly(cabins[k], white[k], None)  # a white cabin; image only


def _ground(rng, cls):
    return (_tones(rng, _GRASS, 25) if cls == GRASS else _tones(rng, _SOIL, 20))[0].tolist()


def _water(cv, rng, reach):
    """A lake or a river; returns spots that boats scatter around and how far."""
    tone, boats = _tones(rng, _WATERS[rng.integers(len(_WATERS))], 15)[0].tolist(), rng.integers(3, 25)
    if rng.random() < 0.5:
        centre, size = cv.sample(rng, 1)[0], rng.uniform(25, 55)
        cv.poly(cv.fix(centre + _star(rng, size, 14)), tone, WATER)
        return centre + rng.standard_normal((boats, 2)) * size * 0.3, 3.0
    phi, half = rng.uniform(0, np.pi), rng.uniform(8, 20)
    u, t = np.array([np.cos(phi), np.sin(phi)]), np.linspace(-1.5 * reach, 1.5 * reach, 9)
    bend = rng.uniform(-0.4, 0.4) * reach + np.cumsum(rng.normal(0, 6, 9))
    bank = np.r_[bend + half, (bend - half)[::-1]]
    cv.poly(cv.fix(np.r_[t, t[::-1]][:, None] * u + bank[:, None] * _perp(u)), tone, WATER)
    along = rng.uniform(-reach, reach, boats)
    return along[:, None] * u + np.interp(along, t, bend)[:, None] * _perp(u), half * 0.35


def render_scene(rng, height, width, with_image=True):
    """Draw one scene; returns (RGB uint8 image or None, uint8 label).

    Every random draw happens whether or not the image is wanted, so label-only rendering
    yields exactly the label of the full rendering.
    """
    scale = rng.uniform(2.2, 4.0) * np.sqrt(height * width / (256 * 512))  # pixels per metre
    azimuth, low_sun = rng.uniform(np.pi / 6, np.pi / 3), rng.uniform(0.2, 0.5)  # shadows fall south-east
    cv = _Canvas(
        height,
        width,
        with_image,
        scale,
        rng.uniform(0, 2 * np.pi),
        low_sun * np.array([np.cos(azimuth), np.sin(azimuth)]),
        rng.uniform(0.3, 0.55),
    )
    reach = 0.5 * np.hypot(height, width) / scale  # metres from the centre to a corner
    base = GRASS if rng.random() < 0.55 else BARE
    cv.lab[:], color = base, _ground(rng, base)
    if cv.img is not None:  # cv2 fills far faster than numpy broadcasting a colour
        cv2.rectangle(cv.img, (0, 0), (width, height), color, -1)
    for _ in range(rng.integers(0, 4)):  # fields of the other ground class
        other = GRASS + BARE - base
        cv.poly(cv.fix(cv.sample(rng, 1)[0] + _star(rng, rng.uniform(15, 45), 9)), _ground(rng, other), other)
    # Water comes before the roads, which cross it as bridges.
    anchors, spread = _water(cv, rng, reach) if rng.random() < 0.35 else (np.zeros((0, 2)), 0.0)
    segments = _roads(cv, rng, reach)
    # Per-image rates, so that some neighbourhoods have no pools or no panels at all.
    rates = np.maximum(0.0, rng.uniform([-0.2, -0.2], [0.7, 0.55]))
    parked, heads, spots = _houses(cv, rng, _lots(cv, rng, segments), *rates)
    p, u, length, w = segments
    which = np.repeat(np.arange(len(p)), rng.poisson(length / 40))  # traffic in both lanes
    side = np.where(rng.random(which.size) < 0.5, 1.0, -1.0)[:, None]
    moving = p[which] + (rng.random(which.size) * length[which])[:, None] * u[which]
    _cars(
        cv, rng, np.r_[parked, moving + side * (w[which] / 4)[:, None] * _perp(u[which])], np.r_[heads, side * u[which]]
    )
    loose = cv.sample(rng, rng.poisson(reach * reach / 500))  # verges and parks
    wood = cv.sample(rng, int(rng.random() < 0.3))
    _trees(
        cv,
        rng,
        np.r_[spots, loose, wood],
        np.r_[rng.uniform(0.5, 2.5, len(spots)), rng.uniform(1, 5, len(loose)), rng.uniform(8, 18, len(wood))],
        np.r_[rng.integers(1, 5, len(spots)), rng.integers(2, 9, len(loose)), rng.integers(20, 50, len(wood))],
    )
    _boats(cv, rng, anchors, spread)
    if cv.img is None:
        return None, cv.lab
    keep = cv2.bitwise_not(cv.shade)
    return _photometric(rng, cv2.multiply(cv.img, cv2.merge([keep, keep, keep]), scale=1 / 255)), cv.lab


class SyntheticAerial(GeneratedScenes):
    class_names = CLASS_NAMES
    palette = PALETTE
    prefix = "aerial"
    render = staticmethod(render_scene)


def main(argv=None) -> int:
    return generator_main(SyntheticAerial, "python -m medoe.data.aerial", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
