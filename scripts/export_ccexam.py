#!/usr/bin/env python3
"""Exports ccexam 1.0.0's three digit classifiers to ONNX (run by `equicrypt fetch-model ccexam`,
in the environment of `scripts/setup-hf.sh`).

    export_ccexam.py DIR

DIR holds what fetch-model unpacked from the wheel: ccexam's own `models.py`, the state dicts
`mnist.pth`, `usps.pth`, `svhn.pth` and `samples/`. Each net is rebuilt from that models.py
(MNISTNet(28), USPSNet(16), SVHNNet(32), as ccexam's inference registry builds them), loaded on the
CPU (the checkpoints were saved from CUDA), put in eval mode (dropout off, batch norm on its running
statistics, which the exporter folds into the convolutions) and exported with torch.onnx.export's TorchScript exporter (dynamo=False: the dynamo
one needs onnxscript), opset 17, float32, input `input` [batch, C, H, W] -> output `logits`
[batch, 10], batch axis dynamic. Before a file is kept, ONNX Runtime (CPU) must reproduce torch's
logits on the package's sample images of that dataset and on a random batch of another size to
1e-4, or the script fails. Writes DIR/{svhn,usps,mnist}.onnx, mnist.onnx last.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_inputs import ccexam_samples  # noqa: E402

TOLERANCE = 1e-4
# name, class in models.py, input size (ccexam.inference.INFERENCE_REGISTRY), channels
NETS = [("svhn", "SVHNNet", 32, 3), ("usps", "USPSNet", 16, 1), ("mnist", "MNISTNet", 28, 1)]


def load_models_py(path: Path):
    spec = importlib.util.spec_from_file_location("ccexam_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(session: ort.InferenceSession, model: torch.nn.Module, x: np.ndarray, what: str) -> float:
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = session.run(["logits"], {"input": x})[0]
    if got.shape != want.shape or got.dtype != np.float32:
        raise SystemExit(f"{what}: ONNX Runtime gave {got.dtype} {got.shape}, torch {want.shape}")
    diff = float(np.abs(got - want).max())
    if not diff < TOLERANCE:
        raise SystemExit(f"{what}: ONNX Runtime differs from torch by {diff:.3g} (limit {TOLERANCE})")
    return diff


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: export_ccexam.py DIR")
    d = Path(sys.argv[1])
    models = load_models_py(d / "models.py")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for name, cls, size, channels in NETS:
        model = getattr(models, cls)(input_size=size)
        state = torch.load(d / f"{name}.pth", map_location="cpu", weights_only=True)
        model.load_state_dict(state)  # strict: every tensor of models.py's net, nothing else
        model = model.float().eval()
        x, labels, files = ccexam_samples(d / "samples", name)
        tmp = d / f".{name}.onnx.tmp"
        # The legacy exporter warns that it is legacy, and the tracer that forward()'s input-size
        # check becomes a constant (it is one: the exported graph has fixed H and W).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (torch.from_numpy(x[:1]),),
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
        m = onnx.load(str(tmp))
        onnx.checker.check_model(m, full_check=True)
        for init in m.graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT:
                raise SystemExit(f"{name}: initializer {init.name} is not float32")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        diff = check(session, model, x, f"{name} samples")
        noise = rng.standard_normal((7, channels, size, size)).astype(np.float32)
        diff = max(diff, check(session, model, noise, f"{name} random batch of 7"))
        logits = session.run(["logits"], {"input": x})[0]
        preds = logits.argmax(1).tolist()
        os.replace(tmp, d / f"{name}.onnx")
        print(f"{name}.onnx: {len(m.graph.node)} nodes; ONNX Runtime = torch to {diff:.2g}; "
              f"samples {files} labels {labels.tolist()} predicted {preds}", file=sys.stderr)


if __name__ == "__main__":
    main()
