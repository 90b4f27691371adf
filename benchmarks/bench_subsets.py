"""Evaluating all 15 modality subsets: each window encoded once and decoded per subset
(engine.evaluation.predict_subsets, what test.py does) against 15 full forward passes.

    python benchmarks/bench_subsets.py [--model imfuse] [--patch-size 64] [--volume 64 64 64] [--repeats 3]

Defaults: IM-Fuse in the paper configuration, one P^3 volume (a single window), two CPU
threads as the machine gives; any model with encode/decode (imfuse, mmformer, robustseg,
sfusion, uhved). Checks that both give the same probabilities and prints the
medians and their ratio (target: at least 2x).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import build_model  # noqa: E402
from utils.brats import SUBSETS  # noqa: E402
from engine.evaluation import predict_subsets  # noqa: E402
from engine.inference import sliding_window  # noqa: E402


def full_passes(model, volume):
    out = []
    with torch.no_grad():
        for mask in SUBSETS:
            m = torch.tensor([mask])
            out.append(sliding_window(volume, model.window, lambda w: model(w, m)[:, None])[0])
    return torch.stack(out)


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="imfuse")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--volume", type=int, nargs=3, help="volume size (default: one window)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    P = args.patch_size
    torch.manual_seed(0)
    config = dict(interleaved=True, mamba_skip=True) if args.model == "imfuse" else {}
    model = build_model(args.model, patch_size=P, **config).eval()
    volume = torch.randn(4, *(args.volume or (P, P, P)))
    predict_subsets(model, volume, SUBSETS[:1])  # warm-up (numba compilation)
    shared_s, shared = timed(lambda: predict_subsets(model, volume, SUBSETS), args.repeats)
    full_s, full = timed(lambda: full_passes(model, volume), args.repeats)
    diff = (shared - full).abs().max().item()
    print(f"{args.model} {config}, P = {P}, volume {tuple(volume.shape[1:])}, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats}")
    print(f"15 full forward passes:        {full_s:7.2f} s")
    print(f"encode once, decode 15 times:  {shared_s:7.2f} s")
    print(f"ratio {full_s / shared_s:.2f}x; largest probability difference {diff:.1e}")
    if diff > 1e-4:
        sys.exit("the shared-encoder probabilities differ from the full passes")


if __name__ == "__main__":
    main()
