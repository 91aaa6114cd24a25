"""Generate the procedural toy-robot example subject in ``assets/toy_robot/``.

Five "photos" of one small toy robot (teal boxy body, round head with two eyes, antenna, arms, orange details)
are rendered with Pillow and numpy only. Each image varies the viewpoint, scale, position and background, and
gets simple shading, a soft shadow and mild sensor noise. The output is deterministic: running
``python assets/make_toy_robot.py`` rewrites exactly the same files.
"""

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent / "toy_robot"
SS = 2  # supersampling factor: scenes are drawn at SS x the output size, then downsampled
TEAL = np.array([30, 150, 150], np.float32)
ORANGE = np.array([245, 125, 30], np.float32)
GREY = np.array([125, 130, 138], np.float32)
DARK = np.array([35, 38, 45], np.float32)
WHITE = np.array([238, 238, 232], np.float32)
LIGHT = np.array([-0.45, -0.55, 0.7]) / np.linalg.norm([-0.45, -0.55, 0.7])  # from the upper left


def noise(rng, h, w, cell):
    """Smooth value noise in [0, 1] whose features are about `cell` pixels across."""
    small = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).clip(0, 1)


def fbm(rng, h, w, cells=(96, 32, 8)):
    """A few octaves of value noise in roughly [0, 1]."""
    return sum(noise(rng, h, w, c) * 0.5**i for i, c in enumerate(cells)) / sum(0.5**i for i in range(len(cells)))


class Layer:
    """A premultiplied RGBA float layer that shaded shapes are painted into."""

    def __init__(self, h, w, k, x0, y0):
        self.rgb = np.zeros((h, w, 3), np.float32)
        self.a = np.zeros((h, w), np.float32)
        self.k, self.x0, self.y0 = k, x0, y0  # robot units -> pixels

    def px(self, x, y):
        return self.x0 + x * self.k, self.y0 + y * self.k

    def paint(self, shape, pts, color, light="box", radius=0.0, shade=1.0):
        """Paint an "rect"/"ellipse"/"poly" given in robot units, lit as a "box", "sphere" or "flat" surface."""
        pts = [self.px(x, y) for x, y in pts]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        bx0, by0, bx1, by1 = min(xs), min(ys), max(xs), max(ys)
        ix0, iy0 = max(int(bx0) - 2, 0), max(int(by0) - 2, 0)
        ix1, iy1 = min(int(bx1) + 3, self.a.shape[1]), min(int(by1) + 3, self.a.shape[0])
        m = Image.new("L", (ix1 - ix0, iy1 - iy0))
        d = ImageDraw.Draw(m)
        local = [(x - ix0, y - iy0) for x, y in pts]
        if shape == "rect":
            d.rounded_rectangle([local[0], local[1]], radius=radius * self.k, fill=255)
        elif shape == "ellipse":
            d.ellipse([local[0], local[1]], fill=255)
        else:
            d.polygon(local, fill=255)
        mask = np.asarray(m, np.float32)[..., None] / 255
        yy, xx = np.mgrid[iy0:iy1, ix0:ix1].astype(np.float32)
        u = ((xx - bx0) / max(bx1 - bx0, 1)).clip(0, 1)
        v = ((yy - by0) / max(by1 - by0, 1)).clip(0, 1)
        if light == "sphere":
            nx, ny = 2 * u - 1, 2 * v - 1
            nz = np.sqrt((1 - nx**2 - ny**2).clip(0, 1))
            diff = (LIGHT[0] * nx + LIGHT[1] * ny + LIGHT[2] * nz).clip(0, 1)
            col = color * (0.3 + 0.8 * diff)[..., None] + 200 * (diff**40)[..., None]
        elif light == "box":
            edge = 1 - 0.25 * ((2 * u - 1) ** 12 + (2 * v - 1) ** 12)
            col = color * (shade * (1.12 - 0.22 * u - 0.25 * v) * edge)[..., None]
        else:
            col = np.broadcast_to(color * shade, mask.shape[:2] + (3,))
        sl = (slice(iy0, iy1), slice(ix0, ix1))
        self.rgb[sl] = self.rgb[sl] * (1 - mask) + col.clip(0, 255) * mask
        self.a[sl] = self.a[sl] * (1 - mask[..., 0]) + mask[..., 0]


def draw_robot(layer, yaw_deg):
    """Draw the robot in a 100 x 132 unit box (x centred on 50, feet at y=132), turned by `yaw_deg`."""
    th = math.radians(yaw_deg)
    c, s = math.cos(th), math.sin(th)
    a, b, dt = 22, 11, 5  # body half-width, half-depth, visible top-face height

    def proj(x, z):  # body-frame (x right, z towards camera) -> (screen x, depth)
        return 50 + x * c + z * s, -x * s + z * c

    # Legs and feet; the far leg first.
    for lx in sorted((-10, 10), key=lambda q: proj(q, 0)[1]):
        x, _ = proj(lx, 0)
        layer.paint("rect", [(x - 5, 100), (x + 5, 124)], GREY, radius=2)
        fx, _ = proj(lx, 4)
        layer.paint("rect", [(fx - 8, 122), (fx + 8, 132)], ORANGE, radius=3)

    def arm(side):
        x, _ = proj(side * (a + 5), 0)
        layer.paint("rect", [(x - 5, 62), (x + 5, 96)], TEAL, radius=4, shade=0.85)
        layer.paint("ellipse", [(x - 6.5, 92), (x + 6.5, 105)], ORANGE, light="sphere")
        layer.paint("ellipse", [(x - 4.5, 60), (x + 4.5, 69)], GREY, light="sphere")

    far_arm, near_arm = sorted((-1, 1), key=lambda q: proj(q * a, 0)[1])
    arm(far_arm)

    # Body: front face, visible side face and top face.
    fx0, fx1 = proj(-a, b)[0], proj(a, b)[0]
    y0, y1 = 62, 104
    layer.paint("rect", [(fx0, y0), (fx1, y1)], TEAL, radius=1.5)
    if abs(s) > 1e-3:
        side = -1 if s > 0 else 1
        ex, bx = proj(side * a, b)[0], proj(side * a, -b)[0]
        layer.paint("poly", [(ex, y0), (bx, y0 - dt), (bx, y1 - dt), (ex, y1)], TEAL, light="flat", shade=0.68)
    bl, br = proj(-a, -b)[0], proj(a, -b)[0]
    layer.paint("poly", [(fx0, y0), (fx1, y0), (br, y0 - dt), (bl, y0 - dt)], TEAL, light="flat", shade=1.18)

    def on_front(rx, y):  # relative x in [0, 1] across the front face
        return fx0 + rx * (fx1 - fx0), y

    layer.paint("rect", [on_front(0.18, 69), on_front(0.82, 96)], ORANGE, radius=2)
    layer.paint("rect", [on_front(0.28, 73), on_front(0.72, 79)], DARK, light="flat", radius=1.5)
    for rx, col in ((0.34, TEAL), (0.5, WHITE), (0.66, TEAL)):
        layer.paint("ellipse", [on_front(rx - 0.045, 84), on_front(rx + 0.045, 91)], col, light="sphere")

    arm(near_arm)

    # Neck, antenna, ears and head.
    layer.paint("rect", [(45, 52), (55, 63)], GREY, radius=1)
    r, hy = 18, 36

    def head_pt(phi_deg):
        p = math.radians(phi_deg) + th
        return 50 + r * math.sin(p), math.cos(p)

    layer.paint("rect", [(49, 6), (51, 20)], GREY, light="flat", shade=0.9)
    layer.paint("ellipse", [(45, 0), (55, 10)], ORANGE, light="sphere")
    ears = [head_pt(phi) for phi in (-90, 90)]
    for ex, depth in ears:
        if depth < 0:
            layer.paint("ellipse", [(ex - 4, hy - 6), (ex + 4, hy + 6)], ORANGE, light="sphere")
    layer.paint("ellipse", [(50 - r, hy - r), (50 + r, hy + r)], TEAL, light="sphere")
    for ex, depth in ears:
        if depth >= 0:
            w = 4 * max(1 - depth, 0.35)
            layer.paint("ellipse", [(ex - w, hy - 6), (ex + w, hy + 6)], ORANGE, light="sphere")
    for phi in (-28, 28):
        ex, depth = head_pt(phi)
        if depth > 0.35:
            w = 5 * depth
            layer.paint("ellipse", [(ex - w, hy - 6), (ex + w, hy + 4)], WHITE, light="sphere")
            px = ex + 1.2 * math.sin(th) * depth
            layer.paint("ellipse", [(px - 2.4 * depth, hy - 3.4), (px + 2.4 * depth, hy + 1.4)], DARK, light="flat")
            layer.paint("ellipse", [(px - 1.6, hy - 3), (px - 0.2, hy - 1.6)], WHITE, light="flat")
    mx, depth = head_pt(0)
    layer.paint("rect", [(mx - 6 * depth, hy + 8), (mx + 6 * depth, hy + 10.5)], DARK, light="flat", radius=1)


# ---------------------------------------------------------------- backgrounds (float arrays, h x w x 3)


def perspective(h, w, horizon, cx):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = np.maximum(yy - horizon, 1.0)
    return (xx - cx) / depth, h / depth, yy  # across, along (grows with distance), row


def bg_wood(rng, h, w):
    across, along, _ = perspective(h, w, -0.9 * h, 0.45 * w)  # looking down at the table top
    u = across * 7
    tone = (np.sin(np.floor(u) * 12.9898) * 43758.5453) % 1  # per-board colour variation
    grain = np.sin(u * 30 + 9 * fbm(rng, h, w, (96, 24)) + 3 * np.floor(u)) * 0.5 + 0.5
    gap = (np.abs(u % 1 - 0.5) > 0.488).astype(np.float32)
    base = np.array([158, 100, 58]) * (0.78 + 0.3 * tone)[..., None] * (0.86 + 0.18 * grain)[..., None]
    return base * (1 - 0.55 * gap)[..., None] * (1.2 - 0.45 * (along / along.max()))[..., None], 0.0


def bg_studio(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - 0.55 * w) / w, (yy - 0.45 * h) / h)
    g = (1.0 - 0.9 * r**1.6).clip(0.45, 1)
    return np.array([238, 236, 232]) * g[..., None], 0.0


def bg_grass(rng, h, w):
    n = fbm(rng, h, w, (128, 32, 8))
    img = np.stack([40 + 50 * n, 95 + 80 * n, 30 + 25 * n], -1)
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(9000):  # short blades of grass
        x, y = rng.random() * w, rng.random() * h
        ln, ang = 8 + 20 * rng.random(), -math.pi / 2 + 0.6 * (rng.random() - 0.5)
        g = int(70 + 110 * rng.random())
        d.line([(x, y), (x + ln * math.cos(ang), y + ln * math.sin(ang))], fill=(g // 2, g, g // 4), width=2)
    return np.asarray(im, np.float32), 1.5


def bg_blue_wall(rng, h, w):
    floor_y = 0.72 * h
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32)
    wall = np.array([62, 112, 172]) * (0.93 + 0.1 * fbm(rng, h, w, (128, 48)))[..., None]
    wall = wall * (0.85 + 0.25 * (yy / h))[..., None]
    skirting = np.array([232, 232, 228]) * (1.1 - 0.2 * (yy / h))[..., None]
    floor = np.array([182, 176, 168]) * (0.85 + 0.15 * fbm(rng, h, w, (128, 48)))[..., None]
    out = np.where((yy < floor_y - 0.035 * h)[..., None], wall, np.where((yy < floor_y)[..., None], skirting, floor))
    return out, 0.0


def bg_tiles(rng, h, w):
    horizon = 0.14 * h
    across, along, yy = perspective(h, w, horizon, 0.6 * w)
    tu, tv = across * 4.5, along * 6.0
    checker = ((np.floor(tu) + np.floor(tv)) % 2)[..., None]
    tile = np.array([228, 216, 196]) * (1 - checker) + np.array([176, 84, 58]) * checker
    grout = ((np.abs(tu % 1 - 0.5) > 0.485) | (np.abs(tv % 1 - 0.5) > 0.48)).astype(np.float32)[..., None]
    floor = (tile * (1 - grout) + 150 * grout) * (0.9 + 0.1 * fbm(rng, h, w))[..., None]
    fade = np.exp(-along / 4)[..., None]  # far tiles blur into their average colour
    floor = (floor * fade + np.array([200, 150, 125]) * (1 - fade)) * (1.05 - 0.2 * (1 - fade))
    wall = np.array([236, 228, 210]) * (0.85 + 0.1 * (yy / horizon))[..., None]
    return np.where((yy < horizon)[..., None], wall, floor), 0.0


# ---------------------------------------------------------------- scene assembly


def render(name, size, bg, seed, height, cx, feet, yaw, tilt=0.0, grain=2.5, tint=(1.0, 1.0, 1.0)):
    """Render one photo: `height`, `cx` and `feet` are fractions of the image height / width / height."""
    rng = np.random.default_rng(seed)
    w, h = size[0] * SS, size[1] * SS
    img, bg_blur = bg(rng, h, w)
    if bg_blur:
        img = np.asarray(
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(bg_blur * SS))
        )
    img = img.astype(np.float32)

    k = height * h / 132
    fx, fy = cx * w, feet * h
    layer = Layer(h, w, k, fx - 50 * k, fy - 132 * k)
    draw_robot(layer, yaw)
    chans = [layer.rgb[..., i] for i in range(3)] + [layer.a]
    if tilt:
        chans = [np.asarray(Image.fromarray(ch).rotate(tilt, Image.BICUBIC, center=(fx, fy))) for ch in chans]
    rgb, alpha = np.stack(chans[:3], -1), chans[3].clip(0, 1)

    # Soft contact shadow under the feet plus a faint cast shadow to the lower right.
    sh = Image.new("L", (w, h))
    ImageDraw.Draw(sh).ellipse([fx - 34 * k, fy - 6 * k, fx + 40 * k, fy + 7 * k], fill=170)
    sh = np.asarray(sh.filter(ImageFilter.GaussianBlur(5 * k)), np.float32) / 255
    cast = Image.fromarray((alpha * 255).astype(np.uint8)).transform(
        (w, h), Image.AFFINE, (1, 0.9, -0.9 * fy - 12 * k, 0, 3.2, -2.2 * fy), Image.BILINEAR
    )
    cast = np.asarray(cast.filter(ImageFilter.GaussianBlur(8 * k)), np.float32) / 255
    img = img * (1 - 0.55 * np.maximum(sh, 0.45 * cast))[..., None]
    img = img * (1 - alpha[..., None]) + rgb

    out = Image.fromarray(img.clip(0, 255).astype(np.uint8)).resize(size, Image.LANCZOS)
    out = out.filter(ImageFilter.GaussianBlur(0.45))
    arr = np.asarray(out, np.float32) * np.array(tint, np.float32)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    arr *= (1 - 0.28 * (((xx / size[0] - 0.5) ** 2 + (yy / size[1] - 0.5) ** 2) * 2) ** 1.5)[..., None]  # vignette
    arr += rng.normal(0, grain, arr.shape)
    path = OUT / name
    img = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8), "RGB")
    if path.suffix == ".png":
        img.save(path, optimize=True)
    else:
        img.save(path, quality=90)
    print(path)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    render("01_wood_table.jpg", (768, 768), bg_wood, 1, 0.55, 0.44, 0.82, yaw=30, tint=(1.04, 1.0, 0.93))
    render("02_studio.jpg", (1024, 768), bg_studio, 2, 0.62, 0.56, 0.86, yaw=0)
    render("03_grass.jpg", (768, 768), bg_grass, 3, 0.42, 0.6, 0.8, yaw=-35, tilt=6)
    render("04_blue_wall.png", (768, 768), bg_blue_wall, 4, 0.82, 0.5, 0.94, yaw=-15, grain=0.0)
    render("05_tiled_floor.jpg", (768, 768), bg_tiles, 5, 0.36, 0.34, 0.76, yaw=35, tilt=-4, tint=(1.0, 0.99, 1.03))


if __name__ == "__main__":
    main()
