"""SyntheticStreets: procedurally drawn, long-tailed street scenes with Cityscapes classes.

Scenes come from a one-point-perspective pinhole camera over a street (road, sidewalks, facades,
a far end) populated with poles, signs, lights, trees, cars, people and bicycles. Colours are
deliberately shared across classes (concrete greys for building/wall/pole/sidewalk/overcast sky,
car paints equal to sign paints, random clothing, greens for both terrain and vegetation), so a
pixel is decided by shape and surroundings, not by its colour alone.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import name2label

from medoe.data.generated import GeneratedScenes, generator_main

_CHOSEN = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "car",
    "bicycle",
]
CLASS_NAMES = sorted(_CHOSEN, key=lambda name: name2label[name].trainId)
PALETTE = [tuple(name2label[name].color) for name in CLASS_NAMES]
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR, BICYCLE) = range(
    len(CLASS_NAMES)
)

_CONCRETE = ((135, 135, 135), 40)  # shared by building, wall, pole, sidewalk, overcast sky
_PAINTS = [
    (180, 30, 35),
    (30, 60, 165),
    (225, 200, 35),
    (225, 225, 225),
    (35, 35, 40),
    (135, 135, 135),
    (50, 105, 60),
]  # car bodies; the first four are also sign colours
_GREENS = ((70, 120, 45), 30)


def _tone(rng, base, spread=12.0):
    # One draw per colour: a shared brightness shift plus a small per-channel tint.
    e = rng.standard_normal(4)
    shift = e[0] * spread * 0.6
    return tuple(min(255.0, max(0.0, float(base[k]) + shift + 6.0 * e[k + 1])) for k in range(3))


class _Canvas:
    """Draws every shape into the label and, when wanted, the image with identical geometry.

    Shapes are given in world metres (x right, y up, z forward) and projected by a pinhole
    camera at height hc; coordinates go to OpenCV with 3 fractional bits so that thin, far
    objects keep their sub-pixel size.
    """

    def __init__(self, height, width, with_image, cam):
        self.lab = np.zeros((height, width), np.uint8)
        self.img = np.zeros((height, width, 3), np.uint8) if with_image else None
        self.f, self.cx, self.hz, self.hc = cam

    def uv(self, x, y, z):  # vectorised projection for batches of points
        z = np.maximum(np.asarray(z, np.float64), 0.3)  # clip points behind the camera
        x, y, z = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64), z)
        return np.stack([self.cx + self.f * x / z, self.hz + self.f * (self.hc - y) / z], -1)

    def _pt(self, x, y, z):
        s = self.f / max(z, 0.3)
        return self.cx + s * x, self.hz + s * (self.hc - y)

    def polys(self, pts, color, cls):
        fixed = np.round(np.clip(np.asarray(pts, np.float64), -1e5, 1e5) * 8).astype(np.int32)
        fixed = list(fixed) if fixed.ndim == 3 else [fixed]
        cv2.fillPoly(self.lab, fixed, int(cls), cv2.LINE_8, 3)
        if self.img is not None:
            cv2.fillPoly(self.img, fixed, color, cv2.LINE_8, 3)

    def front(self, x0, x1, y0, y1, z, color, cls):  # rectangle facing the camera
        (u0, v0), (u1, v1) = self._pt(x0, y0, z), self._pt(x1, y1, z)
        self.polys([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], color, cls)

    def side(self, x, z0, z1, y0, y1, color, cls):  # rectangle on a plane X = x
        a, b, c, d = self._pt(x, y0, z0), self._pt(x, y0, z1), self._pt(x, y1, z1), self._pt(x, y1, z0)
        self.polys([a, b, c, d], color, cls)

    def ground(self, x0, x1, z0, z1, color, cls):
        pts = [self._pt(x0, 0, z0), self._pt(x1, 0, z0), self._pt(x1, 0, z1), self._pt(x0, 0, z1)]
        self.polys(pts, color, cls)

    def disc(self, x, y, z, radius, color, cls, thickness=-1.0):
        (u, v), r = self._pt(x, y, z), self.f * radius / max(z, 0.3)
        t = -1 if thickness < 0 else max(1, int(round(self.f * thickness / z)))
        args = ((int(u * 8), int(v * 8)), (int(r * 8), int(r * 8)), 0, 0, 360)
        cv2.ellipse(self.lab, *args, int(cls), t, cv2.LINE_8, 3)
        if self.img is not None:
            cv2.ellipse(self.img, *args, color, t, cv2.LINE_8, 3)

    def segment(self, p, q, z, width, color, cls):  # thick line between two (x, y) at depth z
        a, b = self._pt(p[0], p[1], z), self._pt(q[0], q[1], z)
        a, b = (int(a[0] * 8), int(a[1] * 8)), (int(b[0] * 8), int(b[1] * 8))
        t = max(1, int(round(self.f * width / z)))
        cv2.line(self.lab, a, b, int(cls), t, cv2.LINE_8, 3)
        if self.img is not None:
            cv2.line(self.img, a, b, color, t, cv2.LINE_8, 3)


def _pole(cv, rng, x, z, pole_color):
    top = rng.uniform(3.0, 7.5)
    width = rng.uniform(0.12, 0.22)
    cv.front(x - width / 2, x + width / 2, 0, top, z, pole_color, POLE)
    kind = rng.random()
    if kind < 0.55:  # a sign near the top of the pole
        y = min(top - 0.4, rng.uniform(2.2, 3.2))
        paint, rim = _tone(rng, _PAINTS[rng.integers(4)], 10), _tone(rng, _PAINTS[rng.integers(4)], 10)
        shape = rng.integers(3)
        if shape == 0:
            cv.disc(x, y, z, 0.35, rim, SIGN)
            cv.disc(x, y, z, 0.25, paint, SIGN)
        elif shape == 1:
            cv.polys(cv.uv([x - 0.4, x + 0.4, x], [y - 0.3, y - 0.3, y + 0.4], z), paint, SIGN)
        else:
            cv.front(x - 0.35, x + 0.35, y - 0.25, y + 0.25, z, paint, SIGN)
    elif kind < 0.85:  # a traffic light on the pole (or on an arm over the road)
        y = min(top - 0.5, rng.uniform(2.6, 4.0))
        box = _tone(rng, (40, 40, 40) if rng.random() < 0.7 else (200, 170, 40), 10)
        cv.front(x - 0.18, x + 0.18, y - 0.45, y + 0.45, z, box, LIGHT)
        lit = rng.integers(3)
        for k, lamp in enumerate([(230, 40, 30), (240, 180, 30), (40, 220, 90)]):
            cv.disc(x, y + 0.28 - 0.28 * k, z, 0.1, lamp if k == lit else (60, 60, 55), LIGHT)
    else:  # a street lamp: its arm over the road is pole too
        arm = -np.sign(x) * rng.uniform(0.8, 2.0)
        cv.segment((x, top), (x + arm, top + 0.2), z, 0.08, pole_color, POLE)


def _fence(cv, rng, x, z0, _extra=None):
    color = _tone(rng, (120, 110, 100), 40)
    z1, top = z0 + rng.uniform(3, 12), rng.uniform(0.9, 1.4)
    cv.side(x, z0, z1, 0, top, color, FENCE)
    zs = np.arange(z0, z1, 2.0)[:, None] + [0.0, 0.12, 0.12, 0.0]
    cv.polys(cv.uv(x, [0.0, 0.0, top, top], zs), _tone(rng, (70, 70, 70), 20), FENCE)  # posts


def _tree(cv, rng, x, z, _extra=None):
    trunk = _tone(rng, (85, 70, 55), 20)
    height = rng.uniform(2.0, 3.5)
    cv.front(x - 0.15, x + 0.15, 0, height, z, trunk, VEGETATION)  # trunks are vegetation too
    for _ in range(rng.integers(3, 7)):
        r = rng.uniform(1.0, 2.2)
        cv.disc(x + rng.uniform(-1.2, 1.2), height + rng.uniform(0.3, 2.5), z, r, _tone(rng, *_GREENS), VEGETATION)


def _car(cv, rng, x, z, _extra=None):
    w, h, length = rng.uniform(1.7, 1.95), rng.uniform(1.35, 1.6), rng.uniform(3.9, 4.8)
    body = _tone(rng, _PAINTS[rng.integers(len(_PAINTS))], 10)
    dark = _tone(rng, (30, 35, 40), 10)
    near = x - w / 2 if x > 0 else x + w / 2  # the side plane facing the camera axis
    cv.side(near, z, z + length, 0.3, 0.65 * h, body, CAR)
    cv.side(near, z + 0.4, z + length - 0.8, 0.6 * h, h, dark, CAR)
    cv.front(x - w / 2, x - w / 2 + 0.3, 0, 0.35, z, (20, 20, 20), CAR)
    cv.front(x + w / 2 - 0.3, x + w / 2, 0, 0.35, z, (20, 20, 20), CAR)
    cv.front(x - w / 2, x + w / 2, 0.3, 0.65 * h, z, body, CAR)
    cv.front(x - 0.42 * w, x + 0.42 * w, 0.6 * h, h, z, body, CAR)
    cv.front(x - 0.36 * w, x + 0.36 * w, 0.66 * h, 0.94 * h, z, dark, CAR)
    for s in (-1, 1):
        cv.front(x + s * 0.4 * w - 0.12, x + s * 0.4 * w + 0.12, 0.45 * h, 0.55 * h, z, (200, 30, 30), CAR)


def _person(cv, rng, x, z, _extra=None):
    h = rng.uniform(1.55, 1.9)
    shirt, pants = _tone(rng, rng.uniform(0, 255, 3), 0), _tone(rng, rng.uniform(0, 255, 3), 0)
    skin = _tone(rng, (190, 150, 120), 50)
    step = rng.uniform(0, 0.15)
    cv.front(x - 0.18 - step, x - 0.02, 0, 0.48 * h, z, pants, PERSON)
    cv.front(x + 0.02, x + 0.18 + step, 0, 0.48 * h, z, pants, PERSON)
    cv.front(x - 0.22, x + 0.22, 0.46 * h, 0.82 * h, z, shirt, PERSON)
    cv.front(x - 0.3, x - 0.22, 0.5 * h, 0.8 * h, z, shirt, PERSON)
    cv.front(x + 0.22, x + 0.3, 0.5 * h, 0.8 * h, z, shirt, PERSON)
    cv.disc(x, 0.9 * h, z, 0.11, skin, PERSON)


def _bicycle(cv, rng, x, z, _extra=None):
    frame = _tone(rng, _PAINTS[rng.integers(len(_PAINTS))], 20)
    hub = 0.34
    for s in (-0.52, 0.52):
        cv.disc(x + s, hub, z, hub, (25, 25, 25), BICYCLE, thickness=0.05)
    crank, seat, bar = (x - 0.05, 0.3), (x - 0.2, 0.9), (x + 0.42, 0.95)
    for p, q in [
        ((x - 0.52, hub), crank),
        (crank, seat),
        (seat, (x - 0.52, hub)),
        (crank, (x + 0.38, 0.8)),
        (seat, (x + 0.38, 0.8)),
        ((x + 0.52, hub), bar),
    ]:
        cv.segment(p, q, z, 0.04, frame, BICYCLE)


def render_scene(rng, height, width, with_image=True):
    """Draw one scene; returns (RGB uint8 image or None, uint8 label).

    Every random draw happens whether or not the image is wanted, so label-only rendering
    (for class statistics) yields exactly the label of the full rendering.
    """
    hz = height * rng.uniform(0.38, 0.5)
    cam = (
        0.5 * (width / 2 + height) * rng.uniform(0.85, 1.15),
        width * rng.uniform(0.4, 0.6),
        hz,
        rng.uniform(1.3, 1.8),
    )
    cv = _Canvas(height, width, with_image, cam)
    road = rng.uniform(2.5, 5.5, 2)  # half-widths left/right of the camera
    verge = (rng.random(2) < 0.5) * rng.uniform(0.6, 2.0, 2)  # grass between road and walk
    walk = rng.uniform(2.0, 5.0, 2)
    zfar = rng.uniform(60.0, 180.0)
    overcast = rng.random() < 0.4
    sky_top = _tone(rng, _CONCRETE[0] if overcast else (95, 140, 205), 20)
    sky_low = _tone(rng, (200, 200, 200) if overcast else (170, 200, 230), 15)
    pavement = _tone(rng, (150, 110, 100) if rng.random() < 0.3 else _CONCRETE[0], 25)
    cut = int(np.ceil(hz))
    cv.lab[:cut], cv.lab[cut:] = SKY, SIDEWALK
    if cv.img is not None:
        ramp = np.linspace(0, 1, max(cut, 1))[:, None, None]
        cv.img[:cut] = (np.array(sky_top) * (1 - ramp) + np.array(sky_low) * ramp).astype(np.uint8)
        cv.img[cut:] = pavement
    for _ in range(rng.integers(0, 4)):  # clouds stay sky
        cv.disc(
            rng.uniform(-60, 60), rng.uniform(30, 60), 200.0, rng.uniform(5, 15), _tone(rng, (225, 225, 230), 15), SKY
        )
    cv.ground(-road[0], road[1], 0.3, zfar, _tone(rng, (85, 85, 88), 25), ROAD)
    paint = _tone(rng, (230, 230, 220) if rng.random() < 0.7 else (220, 190, 40), 10)
    for z in np.arange(rng.uniform(1.0, 4.0), zfar, 9.0):  # dashed centre line: road, not white
        cv.ground(-0.07, 0.07, z, z + 3.0, paint, ROAD)
    grass = (110, 140, 70) if rng.random() < 0.7 else (150, 130, 90)
    for s, idx in ((-1, 0), (1, 1)):
        if verge[idx] > 0:
            x0, x1 = sorted((s * road[idx], s * (road[idx] + verge[idx])))
            cv.ground(x0, x1, 0.3, zfar, _tone(rng, grass, 25), TERRAIN)

    if rng.random() < 0.75:  # buildings across the far end, else a tree line or open sky
        for x in np.cumsum(rng.uniform(8, 25, 20)) - 150:
            cv.front(x - 25, x, 0, rng.uniform(6, 25), zfar, _tone(rng, *_CONCRETE), BUILDING)
    elif rng.random() < 0.6:
        cv.front(-150, 150, 0, rng.uniform(4, 10), zfar, _tone(rng, *_GREENS), VEGETATION)

    objects = []  # (depth, draw, x, extra) painted far to near
    for s, idx in ((-1, 0), (1, 1)):
        curb = road[idx] + verge[idx]
        facade = s * (curb + walk[idx])
        _facades(cv, rng, facade, zfar)
        if rng.random() < 0.45:  # a low wall before the facade, concrete like the buildings
            z0, x = rng.uniform(3, 30), facade - s * rng.uniform(0.2, 1.0)
            cv.side(x, z0, z0 + rng.uniform(5, 20), 0, rng.uniform(0.6, 2.2), _tone(rng, *_CONCRETE), WALL)
        if rng.random() < 0.3:  # a hedge along the facade
            z0, x = rng.uniform(3, 30), facade - s * rng.uniform(0.3, 1.2)
            cv.side(x, z0, z0 + rng.uniform(4, 15), 0, rng.uniform(0.8, 1.6), _tone(rng, *_GREENS), VEGETATION)
        pole_color = _tone(rng, *_CONCRETE) if rng.random() < 0.6 else _tone(rng, (60, 70, 65), 15)
        near = [
            (_fence, rng.binomial(1, 0.4), (4, 30), (0.25, 0.25)),
            (_pole, rng.poisson(1.6), (4, 45), (0.3, 0.6)),
            (_tree, rng.poisson(1.0), (5, 60), (0.6, 1.5)),
            (_person, rng.poisson(0.7), (4, 40), (0.4, walk[idx] - 0.4)),
            (_bicycle, rng.poisson(0.3), (4, 30), (0.8, 1.4)),
            (_car, rng.poisson(2.0), (4, 60), (-verge[idx] - 1.1,) * 2),
        ]  # parked at the curb
        for draw, count, (z0, z1), (x0, x1) in near:
            for _ in range(count):
                objects.append((rng.uniform(z0, z1), draw, s * (curb + rng.uniform(x0, x1)), pole_color))
    for _ in range(rng.poisson(2.0)):  # moving cars in a lane
        objects.append((rng.uniform(6, 70), _car, rng.uniform(-road[0] + 1.2, road[1] - 1.2), None))
    for z, draw, x, extra in sorted(objects, key=lambda item: -item[0]):
        draw(cv, rng, x, z, extra)
    if cv.img is None:
        return None, cv.lab
    return _photometric(rng, cv.img), cv.lab


def _facades(cv, rng, x, zfar):
    z = rng.uniform(0.3, 3.0)
    while z < zfar:  # buildings along the street, sometimes with a gap
        z1 = min(z + rng.uniform(6, 25), zfar)
        gap, tall = rng.random() < 0.2, rng.uniform(4, 16)
        base = _tone(rng, *[_CONCRETE, ((190, 170, 140), 20), ((150, 85, 65), 20)][rng.integers(3)])
        glass = _tone(rng, (55, 65, 80) if rng.random() < 0.7 else (180, 195, 210), 20)
        if not gap:
            cv.side(x, z, z1, 0, tall, base, BUILDING)
            zs, ys = np.arange(z + 1.0, z1 - 1.5, 3.0), np.arange(1.0, tall - 1.5, 3.0)
            if cv.f * 1.3 / max(z, 1.0) > 2 and zs.size and ys.size:  # windows where visible
                zz = np.repeat(zs, ys.size)[:, None] + [0.0, 1.3, 1.3, 0.0]
                yy = np.tile(ys, zs.size)[:, None] + [0.0, 0.0, 1.6, 1.6]
                cv.polys(cv.uv(x, yy, zz), glass, BUILDING)  # windows are building
        z = z1


def _photometric(rng, img):
    """Lighting gradient, soft low-frequency shading and per-pixel noise (image only)."""
    height, width = img.shape[:2]
    a, b, c = rng.uniform(-0.35, 0.35, 3)
    gh, gw = max(2, height // 32), max(2, width // 32)
    # The gain is built on a coarse grid and upsampled: a linear ramp plus smooth blotches.
    low = rng.standard_normal((gh, gw), dtype=np.float32) * np.float32(0.07)
    low += (1 + 0.5 * c + a * np.linspace(-0.5, 0.5, gh)[:, None] + b * np.linspace(-0.5, 0.5, gw)[None]).astype(
        np.float32
    )
    gain = cv2.resize(cv2.merge([low, low, low]), (width, height), interpolation=cv2.INTER_LINEAR)
    lit = cv2.multiply(cv2.GaussianBlur(img, (3, 3), 0), gain, dtype=cv2.CV_16S)
    # Uniform noise from raw bytes (int8, std 73.9) is far cheaper than Gaussian draws.
    noise = np.frombuffer(rng.bytes(img.size), np.int8).reshape(img.shape)
    return cv2.addWeighted(lit, 1.0, noise, rng.uniform(3, 10) / 73.9, 0, dtype=cv2.CV_8U)


class SyntheticStreets(GeneratedScenes):
    class_names = CLASS_NAMES
    palette = PALETTE
    prefix = "synthetic"
    render = staticmethod(render_scene)


def main(argv=None) -> int:
    return generator_main(SyntheticStreets, "python -m medoe.data.synthetic", __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
