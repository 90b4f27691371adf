"""Preprocess the BraTS 2023 training data (one folder per case) for training and evaluation.

    python preprocess.py --input-path RAW --output-path OUT [--workers N] [--min-size 128] [--overwrite]

Writes OUT/vol/<case>_vol.npy, OUT/seg/<case>_seg.npy (as the original IM-Fuse scripts do),
OUT/meta/<case>.json and a seeded 70/10/20 split in OUT/splits/. Faulty cases are reported
one line each and make the exit status 1; the good ones are still written.
"""
import sys

from data.preprocessing import preprocess_all
from utils.parser import ArgumentParser


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-path", required=True, help="folder of BraTS case folders")
    parser.add_argument("--output-path", required=True, help="where vol/, seg/, meta/, splits/ go")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--min-size", type=int, default=128,
                        help="smallest crop per axis (the training patch size)")
    parser.add_argument("--overwrite", action="store_true", help="redo cases already written")
    parser.add_argument("--seed", type=int, default=999, help="seed of the train/val/test split")
    args = parser.parse_args(argv)
    parser.check_writable("--output-path", args.output_path)
    if args.workers < 1 or args.min_size < 1:
        parser.error("--workers and --min-size must be positive")
    try:
        result = preprocess_all(args.input_path, args.output_path, args.workers, args.min_size,
                                args.overwrite, args.seed)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"preprocess.py: {err}", file=sys.stderr)
        return 2
    print(f"written {len(result['written'])}, skipped {len(result['skipped'])} (already done), "
          f"failed {len(result['failed'])}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
