"""Training samples per second of the data pipeline at patch size P (random crop through a
memory map, rotation, intensity change, flips, modality dropout), with 0 and 2 workers.

    python benchmarks/bench_loader.py [--data PREPROCESSED] [--patch-size 128] [--samples 24]

Without --data it makes 4 full-size synthetic cases and preprocesses them in a temporary folder.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.datasets import TrainDataset  # noqa: E402
from data.preprocessing import preprocess_all  # noqa: E402
from data.synthetic import make_cohort  # noqa: E402


def rate(root, cases, patch_size, samples, workers, repeats=3):
    """Median samples per second over `repeats` passes of `samples` samples."""
    ds = TrainDataset(root, (cases * samples)[:samples], window=patch_size, seed=0)
    rates = []
    for epoch in range(repeats):
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=1, num_workers=workers, shuffle=True)
        start = time.perf_counter()
        for _ in loader:
            pass
        rates.append(samples / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a preprocessed folder (vol/, seg/)")
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = f"{tmp}/out"
            make_cohort(f"{tmp}/raw", 4, seed=0)
            preprocess_all(f"{tmp}/raw", root, workers=2, min_size=args.patch_size, progress=False)
        cases = sorted(p.name[:-len("_vol.npy")] for p in Path(root, "vol").iterdir())
        results = {w: rate(root, cases, args.patch_size, args.samples, w) for w in (0, 2)}
    print(f"training samples per second at P={args.patch_size} (median of 3 passes of {args.samples}):")
    for workers, r in results.items():
        print(f"  {workers} workers: {r:6.2f} samples/s")
    print(f"  ratio 2 workers / 0 workers: {results[2] / results[0]:.2f}")


if __name__ == "__main__":
    main()
