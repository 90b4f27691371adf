"""CPU (or GPU) time of one eval forward pass of a model at given patch sizes.

    python benchmarks/bench_forward.py [--model imfuse] [--patch-sizes 64 128 | --window X Y Z]
        [--model_args JSON] [--repeats 3]

Defaults: IM-Fuse in the paper configuration (I-MFB, mamba_skip), all four modalities
present, batch 1; patch sizes 64 and 128 for IM-Fuse and mmFormer, the original's window for
the other models. Prints the median and the minimum over the repeats (after one warm-up
pass, which also compiles the numba kernels) and the peak resident memory of the process.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import build_model  # noqa: E402

PAPER = {"imfuse": dict(interleaved=True, mamba_skip=True), "mmformer": {}, "robustseg": {}, "sfusion": {},
         "shaspec": {}, "uhved": {}, "mam": {}, "m3ae": {}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="imfuse", choices=sorted(PAPER))
    parser.add_argument("--patch-sizes", type=int, nargs="+", help="cubic models")
    parser.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"), help="models with a `window`")
    parser.add_argument("--model_args", type=json.loads, default={}, help="other constructor arguments (JSON)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(f"{args.model} {PAPER[args.model]}, eval forward, batch 1, all modalities, "
          f"{args.device}, {torch.get_num_threads()} threads")
    if args.window:
        sizes = [dict(window=tuple(args.window))]
    elif args.patch_sizes or args.model in ("imfuse", "mmformer"):
        sizes = [dict(patch_size=P) for P in args.patch_sizes or (64, 128)]
    else:
        sizes = [{}]  # the original's window
    for size in sizes:
        torch.manual_seed(0)
        model = build_model(args.model, **size, **PAPER[args.model], **args.model_args).to(args.device).eval()
        x = torch.randn(1, 4, *model.window, device=args.device)
        mask = torch.ones(1, 4, dtype=torch.bool, device=args.device)
        inputs = [x, mask] + ([torch.tensor([[[0, 1]] * 3], device=args.device)] if getattr(model, "uses_position", False) else [])
        times = []
        with torch.inference_mode():
            for _ in range(args.repeats + 1):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(*inputs)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        times = times[1:]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(f"window {'x'.join(map(str, model.window))}: median {statistics.median(times):7.2f} s, min {min(times):7.2f} s "
              f"over {len(times)} runs; peak RSS so far {peak:.1f} GiB")


if __name__ == "__main__":
    main()
