"""A small, deterministic, rendered Re-ID dataset, written in the Market-1501 layout.

Why: the default training run, the bench and the tests need data that needs no download, goes
through the real parser and loader, and is *learnable but not trivial*. Each identity is a drawn
pedestrian with its own clothing; each camera has its own look; each image has its own jitter:

* identity -- upper/lower clothing colours (about half neutral: black, grey, white, navy, denim,
  so many identities share colours), upper pattern (plain / stripes / checks), sleeve length,
  trousers / shorts / skirt, shoes, hair colour and length, hat, bag (none / backpack / hand bag /
  shoulder bag), body proportions (height, build, leg length, head size);
* camera -- background scene, illumination gain, colour cast, contrast, blur, resolution,
  person scale, how often people are seen from the back, how often they are occluded, noise;
* image -- position, scale, stride and arm swing, front or back view, occluders, small
  photometric jitter.

Identities are separated mainly by colours and patterns, which the cameras distort differently, so
a model has to learn colour-constancy-like invariances to match across cameras.

Layout::

    root/
        bounding_box_train/   {pid:04d}_c{cam}s1_{frame:06d}_00.jpg   (train identities)
        query/                one image per test identity for two of its cameras
        bounding_box_test/    every other test image (so each query has same-id images from
                              other cameras in the gallery)
        manifest.json         the config; rendering again with the same config rewrites nothing

Train pids are ``1..num_train_ids`` and test pids ``num_train_ids+1..num_train_ids+num_test_ids``
(disjoint). Default: 48 + 48 identities, 4 cameras, 4 images per identity per camera, 128x64 pixels:
768 train, 96 query and 672 gallery images, rendered in a few seconds; a CPU training run on it
takes a few minutes.

Every random draw comes from ``numpy.random.default_rng([seed, kind, ...])`` keyed by what it
describes (identity, camera, image), so an image does not depend on the order of rendering or on
the other config values that do not concern it.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Literal, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .._typing import StrPath

RENDER_VERSION = 1  # bump when the drawing changes, so old folders get re-rendered
MANIFEST = "manifest.json"
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing
_NAME = re.compile(r"(?P<pid>\d+)_c(?P<cam>\d+)s1_(?P<frame>\d+)_00\.jpg")

RGB = Tuple[int, int, int]


# --------------------------------------------------------------------------------------------
# random attributes
# --------------------------------------------------------------------------------------------
def _hsv(h: float, s: float, v: float) -> RGB:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def _clothing_colour(rng: np.random.Generator, denim: bool = False) -> RGB:
    u = rng.random()
    if denim and u < 0.35:  # jeans: the commonest trousers
        return _hsv(rng.uniform(0.57, 0.63), rng.uniform(0.35, 0.6), rng.uniform(0.25, 0.6))
    if u < 0.5:  # neutral: black .. white, slightly tinted
        return _hsv(rng.random(), rng.uniform(0.0, 0.12), rng.choice([0.08, 0.15, 0.3, 0.5, 0.7, 0.92])
                    + rng.uniform(-0.04, 0.04))
    return _hsv(rng.random(), rng.uniform(0.35, 0.9), rng.uniform(0.3, 0.95))


def _contrasting(rng: np.random.Generator, base: RGB) -> RGB:
    lum = 0.3 * base[0] + 0.59 * base[1] + 0.11 * base[2]
    if rng.random() < 0.5:
        v = rng.uniform(0.05, 0.25) if lum > 110 else rng.uniform(0.75, 0.98)
        return _hsv(rng.random(), rng.uniform(0.0, 0.2), v)
    c = _clothing_colour(rng)
    while abs(0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2] - lum) < 50:
        c = _clothing_colour(rng)
    return c


SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 92), (141, 85, 54),
        (96, 60, 40)]
HAIR = [(20, 16, 14), (45, 30, 22), (80, 55, 35), (130, 95, 60), (200, 170, 110), (150, 150, 150),
        (110, 45, 25)]
HAIR_P = [0.35, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05]


def _jitter_colour(rng: np.random.Generator, c: RGB, amount: float) -> RGB:
    r, g, b = (int(np.clip(v + rng.normal(0, amount), 0, 255)) for v in c)
    return r, g, b


def identity_attributes(seed: int, pid: int) -> Dict:
    rng = np.random.default_rng([seed, 1, pid])
    upper = _clothing_colour(rng)
    bag = rng.choice(["none", "backpack", "handbag", "shoulder"], p=[0.4, 0.25, 0.15, 0.2])
    return {
        "skin": _jitter_colour(rng, SKIN[rng.integers(len(SKIN))], 8),
        "hair": HAIR[rng.choice(len(HAIR), p=HAIR_P)],
        "long_hair": bool(rng.random() < 0.3),
        "hat": _clothing_colour(rng) if rng.random() < 0.12 else None,
        "upper": upper,
        "pattern": str(rng.choice(["plain", "stripes", "checks"], p=[0.55, 0.25, 0.2])),
        "pattern_colour": _contrasting(rng, upper),
        "pattern_period": float(rng.uniform(0.035, 0.07)),  # fraction of the person height
        "long_sleeves": bool(rng.random() < 0.5),
        "lower_kind": str(rng.choice(["trousers", "shorts", "skirt"], p=[0.7, 0.15, 0.15])),
        "lower": _clothing_colour(rng, denim=True),
        "shoes": _hsv(rng.random(), rng.uniform(0, 0.3), rng.choice([0.08, 0.2, 0.9])),
        "bag": str(bag),
        "bag_colour": _clothing_colour(rng),
        "bag_side": int(rng.choice([-1, 1])),
        "height": float(rng.uniform(0.9, 1.04)),
        "build": float(rng.uniform(0.85, 1.2)),
        "legs": float(rng.uniform(0.44, 0.52)),
        "head": float(rng.uniform(0.9, 1.1)),
    }


def camera_attributes(seed: int, cam: int) -> Dict:
    rng = np.random.default_rng([seed, 2, cam])
    return {
        "gain": float(rng.uniform(0.7, 1.25)),
        "cast": np.clip(1.0 + rng.normal(0, 0.09, size=3), 0.78, 1.22),
        "contrast": float(rng.uniform(0.75, 1.15)),
        "blur": float(rng.uniform(0.0, 1.0)),  # output pixels
        "resolution": float(rng.uniform(0.5, 1.0)),  # down- then up-sampling factor
        "scale": float(rng.uniform(0.8, 0.93)),  # person height / image height
        "back_view": float(rng.uniform(0.1, 0.7)),
        "occlusion": float(rng.uniform(0.0, 0.35)),
        "noise": float(rng.uniform(2.0, 7.0)),
        "wall": _hsv(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.9)),
        "floor": _hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.7)),
        "horizon": float(rng.uniform(0.5, 0.8)),
        "bg_seed": int(rng.integers(2**31)),
    }


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------
def _limb(draw: ImageDraw.ImageDraw, p0: Tuple[float, float], p1: Tuple[float, float], w0: float, w1: float,
          fill: RGB) -> None:
    """A tapered segment with round ends (upper arm, shin, ...)."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    n = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / n, dx / n
    draw.polygon([(p0[0] + nx * w0 / 2, p0[1] + ny * w0 / 2), (p1[0] + nx * w1 / 2, p1[1] + ny * w1 / 2),
                  (p1[0] - nx * w1 / 2, p1[1] - ny * w1 / 2), (p0[0] - nx * w0 / 2, p0[1] - ny * w0 / 2)],
                 fill=fill)
    for (x, y), w in ((p0, w0), (p1, w1)):
        draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=fill)


def _background(cam: Dict, size: Tuple[int, int]) -> Image.Image:
    """The camera's scene, larger than the frame so each image can take a shifted crop of it."""
    w, h = size
    rng = np.random.default_rng(cam["bg_seed"])
    img = Image.new("RGB", (w, h), cam["wall"])
    d = ImageDraw.Draw(img)
    horizon = int(h * cam["horizon"])
    # wall: windows, doors, shop signs
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(0.0, 0.8) * horizon
        bw, bh = rng.uniform(0.1, 0.45) * w, rng.uniform(0.08, 0.45) * horizon
        # muted: a blend of the wall colour and a grey, like facades and shop fronts
        a, grey = rng.uniform(0.3, 0.7), rng.uniform(30, 230)
        colour = tuple(int(round((1 - a) * c + a * grey)) for c in cam["wall"])
        d.rectangle([x0, y0, x0 + bw, min(y0 + bh, horizon)], fill=colour)
    # poles
    for _ in range(int(rng.integers(0, 3))):
        x0 = rng.uniform(0, 1) * w
        d.rectangle([x0, 0, x0 + rng.uniform(0.02, 0.05) * w, horizon],
                    fill=_jitter_colour(rng, (90, 90, 90), 30))
    # floor with tile / pavement lines
    d.rectangle([0, horizon, w, h], fill=cam["floor"])
    line = _jitter_colour(rng, cam["floor"], 30)
    y, step = float(horizon), 0.04 * h
    while y < h:
        d.line([(0, y), (w, y)], fill=line, width=1)
        step *= 1.25
        y += step
    return img.filter(ImageFilter.GaussianBlur(0.8))


def _draw_person(img: Image.Image, ident: Dict, rng: np.random.Generator, cam: Dict) -> None:
    W, H = img.size
    d = ImageDraw.Draw(img)
    ph = min(H * cam["scale"] * ident["height"] * rng.uniform(0.94, 1.06), 0.97 * H)
    top = (H - ph) / 2 + rng.uniform(-0.03, 0.03) * H
    foot = top + ph
    cx = W / 2 + rng.uniform(-0.08, 0.08) * W
    back = rng.random() < cam["back_view"]
    b = ident["build"]

    head_h = 0.13 * ph * ident["head"]
    head_w = 0.78 * head_h
    shoulder_y = top + head_h + 0.025 * ph
    hip_y = foot - ident["legs"] * ph
    sh, hip = min(0.125 * ph * b, 0.45 * W), min(0.1 * ph * b, 0.4 * W)
    arm_w, leg_w = 0.055 * ph * b, 0.075 * ph * b
    skin, lower = ident["skin"], ident["lower"]

    # long hair sits behind the head in a front view
    if ident["long_hair"] and not back:
        d.rectangle([cx - head_w * 0.6, top + head_h * 0.3, cx + head_w * 0.6, shoulder_y + 0.05 * ph],
                    fill=ident["hair"])

    # legs, with a stride
    stride = rng.uniform(0.0, 0.1) * ph
    shoe_h = 0.03 * ph
    for side in (-1, 1):
        hip_pt = (cx + side * hip * 0.5, hip_y + 0.02 * ph)
        foot_pt = (cx + side * (hip * 0.5 + stride * 0.5) + rng.uniform(-0.01, 0.01) * ph, foot - shoe_h)
        kind = ident["lower_kind"]
        _limb(d, hip_pt, foot_pt, leg_w, 0.75 * leg_w, lower if kind == "trousers" else skin)
        if kind == "shorts":
            knee = (hip_pt[0] + 0.45 * (foot_pt[0] - hip_pt[0]), hip_pt[1] + 0.45 * (foot_pt[1] - hip_pt[1]))
            _limb(d, hip_pt, knee, leg_w * 1.1, leg_w * 1.05, lower)
        d.ellipse([foot_pt[0] - 0.6 * leg_w, foot - 1.4 * shoe_h, foot_pt[0] + 0.7 * leg_w, foot],
                  fill=ident["shoes"])
    d.rectangle([cx - hip, hip_y - 0.02 * ph, cx + hip, hip_y + 0.06 * ph], fill=lower)
    if ident["lower_kind"] == "skirt":
        d.polygon([(cx - hip, hip_y - 0.02 * ph), (cx + hip, hip_y - 0.02 * ph),
                   (cx + hip * 1.5, hip_y + 0.24 * ph), (cx - hip * 1.5, hip_y + 0.24 * ph)], fill=lower)

    # torso with its pattern: draw the pattern on a layer, paste it through the torso's mask
    torso = [(cx - sh, shoulder_y + 0.015 * ph), (cx + sh, shoulder_y + 0.015 * ph),
             (cx + hip * 1.05, hip_y + 0.02 * ph), (cx - hip * 1.05, hip_y + 0.02 * ph)]
    mask = Image.new("L", (W, H), 0)
    md = ImageDraw.Draw(mask)
    md.polygon(torso, fill=255)
    for side in (-1, 1):
        md.ellipse([cx + side * (sh - arm_w * 0.6) - arm_w * 0.7, shoulder_y,
                    cx + side * (sh - arm_w * 0.6) + arm_w * 0.7, shoulder_y + arm_w * 1.2], fill=255)
    md.rectangle([cx - 0.3 * head_w, shoulder_y - 0.02 * ph, cx + 0.3 * head_w, shoulder_y + 0.02 * ph],
                 fill=255)
    layer = Image.new("RGB", (W, H), ident["upper"])
    if ident["pattern"] != "plain":
        ld = ImageDraw.Draw(layer)
        period = max(2.0, ident["pattern_period"] * ph)
        phase = rng.uniform(0, period)
        y = shoulder_y - phase
        while y < hip_y + 0.05 * ph:
            ld.rectangle([0, y, W, y + period * 0.45], fill=ident["pattern_colour"])
            y += period
        if ident["pattern"] == "checks":
            x = cx - sh - rng.uniform(0, period)
            while x < cx + sh + period:
                ld.rectangle([x, 0, x + period * 0.45, H], fill=ident["pattern_colour"])
                x += period
    img.paste(layer, (0, 0), mask)

    bag, bag_c = ident["bag"], ident["bag_colour"]
    if bag == "backpack":
        if back:
            d.rounded_rectangle([cx - hip * 0.95, shoulder_y + 0.03 * ph, cx + hip * 0.95, hip_y - 0.01 * ph],
                                radius=0.03 * ph, fill=bag_c)
        else:
            for side in (-1, 1):
                _limb(d, (cx + side * sh * 0.55, shoulder_y + 0.01 * ph),
                      (cx + side * sh * 0.6, shoulder_y + 0.2 * ph), 0.025 * ph, 0.025 * ph, bag_c)

    # arms: sleeves in the upper colour, skin below short sleeves, swinging
    hand_pts = []
    for side in (-1, 1):
        swing = rng.uniform(-0.25, 0.25)
        ang = side * rng.uniform(0.04, 0.18) + swing
        s_pt = (cx + side * (sh - arm_w * 0.5), shoulder_y + arm_w * 0.6)
        arm_len = 0.37 * ph
        h_pt = (s_pt[0] + math.sin(ang) * arm_len, s_pt[1] + math.cos(ang) * arm_len)
        elbow = ((s_pt[0] + h_pt[0]) / 2, (s_pt[1] + h_pt[1]) / 2)
        if ident["long_sleeves"]:
            _limb(d, s_pt, h_pt, arm_w, 0.8 * arm_w, ident["upper"])
        else:
            _limb(d, elbow, h_pt, 0.85 * arm_w, 0.7 * arm_w, skin)
            _limb(d, s_pt, elbow, arm_w * 1.1, arm_w * 0.95, ident["upper"])
        d.ellipse([h_pt[0] - 0.45 * arm_w, h_pt[1] - 0.3 * arm_w, h_pt[0] + 0.45 * arm_w,
                   h_pt[1] + 0.6 * arm_w], fill=skin)
        hand_pts.append(h_pt)

    if bag == "handbag":
        hx, hy = hand_pts[0 if ident["bag_side"] < 0 else 1]
        bw, bh = 0.16 * ph, 0.12 * ph
        d.line([(hx, hy), (hx - bw * 0.3, hy + bh * 0.4)], fill=bag_c, width=max(1, int(0.01 * ph)))
        d.rounded_rectangle([hx - bw * 0.5, hy + bh * 0.3, hx + bw * 0.5, hy + bh * 1.2],
                            radius=0.02 * ph, fill=bag_c)
    elif bag == "shoulder":
        s = ident["bag_side"]
        _limb(d, (cx - s * sh * 0.7, shoulder_y + 0.01 * ph), (cx + s * hip * 1.1, hip_y), 0.022 * ph,
              0.022 * ph, bag_c)
        d.rounded_rectangle([cx + s * hip * 1.1 - 0.08 * ph, hip_y - 0.04 * ph,
                             cx + s * hip * 1.1 + 0.08 * ph, hip_y + 0.07 * ph], radius=0.015 * ph, fill=bag_c)

    # head and hair
    hx0, hy0, hx1, hy1 = cx - head_w / 2, top, cx + head_w / 2, top + head_h
    d.ellipse([hx0, hy0, hx1, hy1], fill=ident["hair"] if back else skin)
    if back:
        if ident["long_hair"]:
            d.rectangle([cx - head_w * 0.55, top + head_h * 0.5, cx + head_w * 0.55, shoulder_y + 0.07 * ph],
                        fill=ident["hair"])
    else:
        d.chord([hx0, hy0, hx1, hy1 + head_h * 0.3], 180, 360, fill=ident["hair"])
    if ident["hat"] is not None:
        d.chord([hx0 - 0.05 * head_w, hy0 - 0.1 * head_h, hx1 + 0.05 * head_w, hy0 + 0.7 * head_h], 180, 360,
                fill=ident["hat"])
        d.rectangle([hx0 - 0.15 * head_w, hy0 + 0.3 * head_h, hx1 + 0.15 * head_w, hy0 + 0.38 * head_h],
                    fill=ident["hat"])


def _draw_occluder(img: Image.Image, rng: np.random.Generator) -> None:
    W, H = img.size
    d = ImageDraw.Draw(img)
    colour = _clothing_colour(rng)
    if rng.random() < 0.6:  # car / bench / railing across the bottom
        y0 = H * rng.uniform(0.65, 0.85)
        x0 = W * rng.uniform(-0.3, 0.3)
        x1 = x0 + W * rng.uniform(0.6, 1.3)
        d.rounded_rectangle([x0, y0, x1, H + 5], radius=0.03 * H, fill=colour)
        d.rectangle([x0, y0 + 0.04 * H, x1, y0 + 0.06 * H], fill=_jitter_colour(rng, colour, 60))
    else:  # a pole or a passer-by at one side
        side = rng.choice([-1, 1])
        bw = W * rng.uniform(0.15, 0.3)
        x0 = (W * rng.uniform(-0.05, 0.05)) if side < 0 else (W - bw + W * rng.uniform(-0.05, 0.05))
        d.rounded_rectangle([x0, H * rng.uniform(0.0, 0.4), x0 + bw, H + 5], radius=0.3 * bw, fill=colour)


def render_image(seed: int, pid: int, cam: int, index: int, height: int, width: int,
                 _cache: Dict | None = None) -> Image.Image:
    """One image of identity ``pid`` seen by camera ``cam`` (1-based), deterministic in its arguments."""
    cache = {} if _cache is None else _cache  # attributes and scenes shared by many images
    W, H = width * SUPERSAMPLE, height * SUPERSAMPLE
    margin_x, margin_y = W // 2, H // 8
    if ("id", seed, pid) not in cache:
        cache[("id", seed, pid)] = identity_attributes(seed, pid)
    if ("cam", seed, cam) not in cache:
        cache[("cam", seed, cam)] = camera_attributes(seed, cam)
    ident, cama = cache[("id", seed, pid)], cache[("cam", seed, cam)]
    if ("bg", seed, cam, W, H) not in cache:
        cache[("bg", seed, cam, W, H)] = _background(cama, (W + margin_x, H + margin_y))
    bg = cache[("bg", seed, cam, W, H)]
    rng = np.random.default_rng([seed, 3, pid, cam, index])
    ox, oy = int(rng.integers(0, margin_x + 1)), int(rng.integers(0, margin_y + 1))
    img = bg.crop((ox, oy, ox + W, oy + H))
    _draw_person(img, ident, rng, cama)
    if rng.random() < cama["occlusion"]:
        _draw_occluder(img, rng)

    img = img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
    res = cama["resolution"] * rng.uniform(0.9, 1.1)
    if res < 0.95:  # low-resolution camera: lose detail, keep the size
        small = (max(8, int(round(width * res))), max(8, int(round(height * res))))
        img = img.resize(small, Image.Resampling.BILINEAR).resize((width, height), Image.Resampling.BILINEAR)
    blur = cama["blur"] + rng.uniform(0.0, 0.3)
    if blur > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(blur))

    x = np.asarray(img, dtype=np.float32)
    x = x * (cama["cast"] * cama["gain"] * rng.uniform(0.92, 1.08)).astype(np.float32)
    mean = x.mean()
    x = (x - mean) * cama["contrast"] + mean
    x = x + rng.normal(0.0, cama["noise"], size=x.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# the dataset folder
# --------------------------------------------------------------------------------------------
def _query_cams(test_index: int, num_cams: int, images_per_cam: int) -> List[int]:
    """0-based cameras that give a query for this test identity.

    Two cameras, rotating with the identity; each keeps its other images in the gallery. With one
    image per camera a queried camera has nothing left, so at most ``num_cams - 1`` cameras are
    queried and the rest guarantee a cross-camera match.
    """
    n = min(2, num_cams) if images_per_cam >= 2 else min(2, num_cams - 1)
    start, step = test_index % num_cams, max(1, num_cams // 2)
    return sorted({(start + k * step) % num_cams for k in range(n)})


def _plan(cfg: Dict) -> Dict[str, List[Tuple[int, int, int]]]:
    """(pid, cam 1-based, index) of every image, per split."""
    n_tr, n_te, n_cam, n_img = (cfg["num_train_ids"], cfg["num_test_ids"], cfg["num_cams"],
                               cfg["images_per_cam"])
    plan: Dict[str, List[Tuple[int, int, int]]] = {s: [] for s in SPLITS}
    for pid in range(1, n_tr + 1):
        for cam in range(1, n_cam + 1):
            plan["bounding_box_train"] += [(pid, cam, i) for i in range(n_img)]
    for j in range(n_te):
        pid = n_tr + 1 + j
        qcams = _query_cams(j, n_cam, n_img)
        for cam in range(1, n_cam + 1):
            for i in range(n_img):
                split = "query" if (cam - 1) in qcams and i == 0 else "bounding_box_test"
                plan[split].append((pid, cam, i))
    return plan


def _file_name(pid: int, cam: int, index: int) -> str:
    return f"{pid:04d}_c{cam}s1_{index:06d}_00.jpg"


#: Upper limits of a rendering: an image side (supersampled 2x while drawing) and the number of images.
#: They keep a mistyped option, or a hand-made config, from filling memory or the disk.
MAX_SIDE = 2048
MAX_IMAGES = 1_000_000


def check_synthetic_config(cfg: Dict) -> None:
    """ValueError naming the setting if ``cfg`` (render_synthetic's keyword arguments) is not a set
    that can be rendered: integers of the right range, at most MAX_IMAGES images of at most MAX_SIDE
    pixels a side."""
    for key, lo, hi in (("num_train_ids", 1, None), ("num_test_ids", 1, None), ("num_cams", 2, None),
                        ("images_per_cam", 1, None), ("height", 32, MAX_SIDE), ("width", 16, MAX_SIDE),
                        ("seed", 0, 2 ** 63 - 1)):
        v = cfg[key]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"render_synthetic: {key} must be an integer {rng}, got {v!r}")
    if cfg["num_cams"] > 9:
        raise ValueError(f"render_synthetic: num_cams must be <= 9 (Market-1501 names hold one digit), "
                         f"got {cfg['num_cams']}")
    if cfg["num_train_ids"] + cfg["num_test_ids"] > 9999:
        raise ValueError("render_synthetic: num_train_ids + num_test_ids must be <= 9999 (4-digit pids)")
    total = (int(cfg["num_train_ids"]) + int(cfg["num_test_ids"])) * int(cfg["num_cams"]) * int(cfg["images_per_cam"])
    if total > MAX_IMAGES:
        raise ValueError(f"render_synthetic: (num_train_ids + num_test_ids) x num_cams x images_per_cam = {total} "
                         f"images, more than the {MAX_IMAGES} a synthetic set may have")


def _check_writable_root(root: Path) -> None:
    """ValueError if ``root`` cannot be a folder to render into: it is a file, or a file stands where
    one of its parent folders would be (checked before anything is written)."""
    for p in [root, *root.parents]:
        if p.exists():
            if not p.is_dir():
                what = "is a file, not a folder" if p == root else f"is under {str(p)!r}, which is a file"
                raise ValueError(f"render_synthetic: cannot render into {str(root)!r}: it {what}")
            break


def _read_manifest(root: Path) -> Dict | None:
    try:
        with open(root / MANIFEST, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _complete(root: Path, manifest: Dict) -> bool:
    counts = manifest.get("counts", {})
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            return False
        n = sum(1 for p in folder.iterdir() if p.suffix == ".jpg")
        if n != counts.get(split):
            return False
    return True


def render_synthetic(root: StrPath, num_train_ids: int = 48, num_test_ids: int = 48, num_cams: int = 4,
                     images_per_cam: int = 4, height: int = 128, width: int = 64, seed: int = 0) -> Path:
    """Render (idempotently) the synthetic Re-ID set into ``root`` and return ``root`` as a Path.

    ``root`` is the dataset folder itself (``build_dataset("synthetic", root)`` parses it). If it
    holds a set rendered with the same config (``manifest.json``) and all files are there, nothing is
    written. With a different config the old images are removed and the set is re-rendered. A
    folder that has Market-1501 split folders but no manifest is not ours: FileExistsError rather
    than overwriting someone's data.
    """
    cfg = {"num_train_ids": num_train_ids, "num_test_ids": num_test_ids, "num_cams": num_cams,
           "images_per_cam": images_per_cam, "height": height, "width": width, "seed": seed}
    check_synthetic_config(cfg)
    cfg = {k: int(v) for k, v in cfg.items()}
    root = Path(os.path.expanduser(str(root)))
    _check_writable_root(root)
    manifest = _read_manifest(root)
    if manifest is not None and manifest.get("version") == RENDER_VERSION and manifest.get("config") == cfg \
            and _complete(root, manifest):
        return root

    if manifest is None and any((root / s).is_dir() and any((root / s).iterdir()) for s in SPLITS):
        raise FileExistsError(
            f"render_synthetic: {str(root)!r} holds image folders but no {MANIFEST}; it is not a "
            f"synthetic set rendered here, so it is left alone. Pass an empty or new folder."
        )
    # Remove the manifest first: an interrupted render then re-renders next time.
    (root / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.iterdir():
            if p.is_file() and _NAME.fullmatch(p.name):
                p.unlink()

    plan = _plan(cfg)
    cache: Dict = {}
    for split, entries in plan.items():
        for pid, cam, index in entries:
            img = render_image(seed, pid, cam, index, height, width, cache)
            img.save(root / split / _file_name(pid, cam, index), format="JPEG", quality=92)

    manifest = {
        "generator": "ksl_ops.data.synthetic",
        "version": RENDER_VERSION,
        "config": cfg,
        "counts": {s: len(v) for s, v in plan.items()},
        "train_pids": [1, num_train_ids],
        "test_pids": [num_train_ids + 1, num_train_ids + num_test_ids],
    }
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
    os.replace(tmp, root / MANIFEST)
    return root


def is_rendered(root: StrPath, num_train_ids: int = 48, num_test_ids: int = 48, num_cams: int = 4,
                images_per_cam: int = 4,
                height: int = 128, width: int = 64, seed: int = 0) -> bool:
    """Whether ``root`` holds a complete set rendered with exactly these settings (the arguments of
    render_synthetic), so that render_synthetic would write nothing there. Only reads."""
    cfg = {"num_train_ids": num_train_ids, "num_test_ids": num_test_ids, "num_cams": num_cams,
           "images_per_cam": images_per_cam, "height": height, "width": width, "seed": seed}
    try:
        check_synthetic_config(cfg)
    except ValueError:
        return False
    root = Path(os.path.expanduser(str(root)))
    if not (root / MANIFEST).is_file():
        return False
    manifest = _read_manifest(root)
    return (isinstance(manifest, dict) and manifest.get("version") == RENDER_VERSION
            and manifest.get("config") == {k: int(v) for k, v in cfg.items()}
            and isinstance(manifest.get("counts"), dict) and _complete(root, manifest))


def synthetic_preview(root: StrPath, out_png: StrPath, num_ids: int = 8,
                      split: Literal["bounding_box_train", "query", "bounding_box_test"] = "bounding_box_train",
                      per_cam: int = 2) -> Path:
    """Save a contact sheet: one row per identity, ``per_cam`` images from each camera.

    Works on any Market-1501 style folder (``root`` is the dataset folder).
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"synthetic_preview: expected folder {str(folder)!r} (not found)")
    by_id: Dict[int, Dict[int, List[Path]]] = {}
    for p in sorted(folder.iterdir()):
        m = re.match(r"(-?\d+)_c(\d+)", p.name)
        if m and p.suffix.lower() in (".jpg", ".jpeg", ".png"):
            by_id.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), []).append(p)
    pids = [pid for pid in sorted(by_id) if pid > 0][:num_ids]
    if not pids:
        raise ValueError(f"synthetic_preview: no images in {str(folder)!r}")
    cams = sorted({c for pid in pids for c in by_id[pid]})
    with Image.open(next(iter(by_id[pids[0]].values()))[0]) as im:
        w, h = im.size
    pad, label_w, head_h = 2, 40, 14
    sheet = Image.new("RGB", (label_w + len(cams) * per_cam * (w + pad) + pad * len(cams),
                              head_h + len(pids) * (h + pad)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for ci, cam in enumerate(cams):
        d.text((label_w + ci * (per_cam * (w + pad) + pad) + 2, 1), f"cam {cam}", fill=(0, 0, 0))
    for ri, pid in enumerate(pids):
        y = head_h + ri * (h + pad)
        d.text((2, y + h // 2 - 5), f"{pid:04d}", fill=(0, 0, 0))
        for ci, cam in enumerate(cams):
            for k, p in enumerate(by_id[pid].get(cam, [])[:per_cam]):
                with Image.open(p) as im:
                    sheet.paste(im.convert("RGB"), (label_w + ci * (per_cam * (w + pad) + pad) + k * (w + pad), y))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
