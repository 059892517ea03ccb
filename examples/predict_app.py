"""A minimal app on top of an edgerep bundle: ``edgerep.load`` -> numpy in, numpy out.

Needs numpy and one runtime (onnxruntime, openvino, ...); torch is not needed::

    python examples/predict_app.py BUNDLE_DIR [--prefer openvino,onnxruntime] [--threads 4]

It loads the bundle (manifest validated, best runtime here chosen), runs a random
input of the bundle's input shape (symbolic dims set to 1) from 4 threads at once,
and prints the chosen runtime and the top class of each call.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import edgerep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--prefer", default="", help="comma-separated runtimes to try, in order")
    p.add_argument("--threads", type=int, default=4, help="concurrent callers")
    args = p.parse_args()

    prefer = [r for r in args.prefer.split(",") if r] or None
    with edgerep.load(args.bundle, prefer=prefer, pool_size=2) as predictor:
        print(f"runtime: {predictor.runtime} ({predictor.format}); inputs: {predictor.inputs}")
        rng = np.random.default_rng(0)
        feeds = [
            {
                t["name"]: rng.standard_normal(
                    [d if isinstance(d, int) else 1 for d in t["shape"]]
                ).astype(t["dtype"])
                for t in predictor.inputs
            }
            for _ in range(8)
        ]
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            for i, out in enumerate(pool.map(predictor, feeds)):
                first = next(iter(out.values()))
                print(f"call {i}: output shape {first.shape}, top class {int(first.argmax())}")


if __name__ == "__main__":
    main()
