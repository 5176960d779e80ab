#!/usr/bin/env python3
"""Runs an ONNX model on stock ONNX Runtime (CPU) over inputs written by `scripts/onnx_inputs.py`
(environment: `scripts/setup-hf.sh`).

    ort_run.py MODEL.onnx --inputs DIR --out OUT.npy [--output NAME] [--batch 64]
    ort_run.py MODEL.onnx --input NAME=FILE.npy … --out OUT.npy
    ort_run.py MODEL.onnx --inputs DIR --bench SECONDS [--batch 64]

Every graph input NAME is read from DIR/NAME.npy (all with the same length along axis 0, the
batch axis) and the model is run in slices of --batch rows. The first output (or --output NAME) of
all slices, concatenated, is written to OUT.npy as float32. With --bench it runs the whole input
set once to warm up, then its slices round and round for about SECONDS (until the first slice that
ends after them), and prints one JSON line {"images": n, "seconds": t, "images_per_s": r} (n: rows
run in the timed part).

CPUExecutionProvider, intra_op_num_threads from $ORT_THREADS (default 1), inter_op 1, default
graph optimizations. Errors (a missing input file, a wrong dtype or shape, a failed run) are one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# ONNX tensor element types the models use -> numpy
ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


# Inputs fed whole to every slice (1-D integer tensors: shape values, not data).
unbatched: set[str] = set()


def rows(feeds: dict[str, np.ndarray], start: int, end: int) -> dict[str, np.ndarray]:
    return {k: (v if k in unbatched else v[start:end]) for k, v in feeds.items()}


class Failure(Exception):
    """An error reported as one line and exit status 2."""


def load_inputs(session, inputs: Path | None, files: dict[str, Path]) -> tuple[dict[str, np.ndarray], int]:
    feeds: dict[str, np.ndarray] = {}
    unbatched.clear()
    n = None
    for i in session.get_inputs():
        path = files[i.name] if i.name in files else (inputs or Path(".")) / f"{i.name}.npy"
        if not path.is_file():
            raise Failure(f"missing input file {path} (graph input {i.name!r})")
        try:
            a = np.load(path, allow_pickle=False)
        except Exception as e:  # a truncated or foreign file
            raise Failure(f"cannot read {path}: {e}") from None
        want = ORT_TYPES.get(i.type)
        if want is None:
            raise Failure(f"graph input {i.name!r} has type {i.type}, which ort_run.py does not feed")
        if a.dtype != want:
            raise Failure(f"{path}: dtype {a.dtype}, graph input {i.name!r} is {i.type}")
        shape = i.shape
        if a.ndim != len(shape) or a.ndim == 0:
            raise Failure(f"{path}: shape {list(a.shape)}, graph input {i.name!r} is {shape}")
        for axis, (have, dim) in enumerate(zip(a.shape, shape)):
            if isinstance(dim, int) and dim != have and not (axis == 0 and dim in (0, -1)):
                raise Failure(f"{path}: shape {list(a.shape)}, graph input {i.name!r} is {shape}")
        feeds[i.name] = np.ascontiguousarray(a)
        if a.dtype.kind in "iu" and a.ndim == 1:
            # Shape arithmetic that crossed a split (a grid size): passed whole, not batched.
            unbatched.add(i.name)
            continue
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise Failure(f"{path}: {a.shape[0]} rows, the other inputs have {n}")
    if n is None:
        raise Failure("the model has no graph inputs")
    if n == 0:
        raise Failure("the inputs have no rows")
    return feeds, n


def run_all(session, feeds: dict[str, np.ndarray], n: int, batch: int, output: str) -> np.ndarray:
    parts = []
    for start in range(0, n, batch):
        part = rows(feeds, start, start + batch)
        parts.append(session.run([output], part)[0])
    return np.concatenate(parts, axis=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--inputs", type=Path, help="folder of <graph input>.npy")
    ap.add_argument("--input", action="append", default=[], metavar="NAME=FILE",
                    help="the .npy file of graph input NAME (names with '/' cannot be file names)")
    ap.add_argument("--out", type=Path, help="where to write the output (float32 .npy)")
    ap.add_argument("--output", help="graph output to write (default: the first)")
    ap.add_argument("--batch", type=int, default=64, help="rows per run (default 64)")
    ap.add_argument("--bench", type=float, metavar="SECONDS",
                    help="time repeated runs over all inputs instead of writing the output")
    a = ap.parse_args()
    if a.bench is None and a.out is None:
        ap.error("--out is required unless --bench is given")
    files = {}
    for spec in a.input:
        name, sep, file = spec.rpartition("=")
        if not sep or not name:
            ap.error(f"--input {spec!r} is not NAME=FILE")
        files[name] = Path(file)
    if a.inputs is None and not files:
        ap.error("give --inputs DIR or --input NAME=FILE")
    if a.batch < 1:
        ap.error("--batch must be at least 1")
    try:
        import onnxruntime as ort

        try:
            threads = int(os.environ.get("ORT_THREADS", "1"))
        except ValueError:
            raise Failure(f"ORT_THREADS={os.environ['ORT_THREADS']!r} is not a number") from None
        if not a.model.is_file():
            raise Failure(f"no model file {a.model}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(a.model), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as e:
            raise Failure(f"ONNX Runtime cannot load {a.model}: {one_line(e)}") from None
        outputs = [o.name for o in session.get_outputs()]
        output = a.output or outputs[0]
        if output not in outputs:
            raise Failure(f"{a.model} has no output {output!r} (outputs: {outputs})")
        feeds, n = load_inputs(session, a.inputs, files)
        try:
            if a.bench is not None:
                run_all(session, feeds, n, a.batch, output)  # warm-up
                # Round and round the input set, slice by slice, until the time is up.
                slices = [rows(feeds, s, s + a.batch) for s in range(0, n, a.batch)]
                images, start, i = 0, time.perf_counter(), 0
                while True:
                    part = slices[i % len(slices)]
                    session.run([output], part)
                    images += len(next(v for k, v in part.items() if k not in unbatched))
                    i += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= a.bench:
                        break
                print(json.dumps({"images": images, "seconds": round(elapsed, 4),
                                  "images_per_s": round(images / elapsed, 3)}))
                return 0
            result = run_all(session, feeds, n, a.batch, output)
        except Exception as e:
            raise Failure(f"running {a.model} failed: {one_line(e)}") from None
        a.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(a.out, result.astype(np.float32, copy=False))
        print(f"{a.out}: {output} float32 {list(result.shape)}", file=sys.stderr)
        return 0
    except Failure as e:
        print(f"ort_run.py: {e}", file=sys.stderr)
        return 2


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
