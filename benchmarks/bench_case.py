"""One full-size BraTS case through predict.py on the CPU: the float32 reference path against
the optimised path, each in a process of its own.

    python benchmarks/bench_case.py [--model imfuse] [--resume CKPT] [--repeats 3]
        [--size 240 240 155] [--missing t1 t2]

A synthetic case (data.synthetic, seed 0) goes through predict.main in two child processes,
one per path: with --reference_path (PyTorch's operators only, the C allocator's defaults)
and without (the fused CPU kernels of models/cpu_kernels.py, the grouped entry convs,
channels-last convolutions, freed memory kept by the allocator and glibc's tcache off:
utils/memory.py, which is process-wide, hence a process per path). Without --resume the model is the registered
model's paper configuration with random weights (seed 0). In each process a first run warms
up (numba loads its compiled kernels) and also writes the probabilities; then per path the
median and every time of predict.main over the repeats (reading, preprocessing, every window,
writing the labels and the report; not the interpreter's start), the peak resident memory
during its runs, the ratio of the medians, and how the two agree: Dice of WT, TC and ET
between their label maps and the largest difference of their probabilities.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import predict  # noqa: E402
from bench_train_step import PAPER  # noqa: E402
from data.patient import modality_files  # noqa: E402
from data.synthetic import make_case  # noqa: E402
from engine import build_model  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from utils.brats import MODALITIES, REGIONS  # noqa: E402
from utils.memory import TCACHE_OFF  # noqa: E402

PATHS = ("reference", "fused")


class PeakRSS:
    """The largest resident set size of this process while the context runs (sampled every 10 ms)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while True:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            if self._stop.wait(0.01):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2 * float((a & b).sum()) / total


def run_path(name, ckpt, inputs, out_dir, repeats):
    """One path's runs in this process: a warm-up that also writes the probabilities, then
    `repeats` timed runs -> {"times": [...], "warmup": s, "peak": bytes}."""
    flags = ["--reference_path"] if name == "reference" else []
    times, peak, warmup = [], 0, None
    for repeat in range(repeats + 1):
        argv = ["--resume", ckpt, *inputs, "--output", os.path.join(out_dir, "seg.nii.gz"), "--no_progress", *flags]
        with PeakRSS() as rss:
            start = time.perf_counter()
            if predict.main(argv + (["--probabilities"] if repeat == 0 else [])) != 0:
                sys.exit(f"bench_case.py: predict.py failed on the {name} path")
            seconds = time.perf_counter() - start
        peak = max(peak, rss.peak)
        if repeat:
            times.append(seconds)
        else:
            warmup = seconds
        print(f"  {name}, {f'run {repeat}' if repeat else 'warm-up (with --probabilities)'}: {seconds:.1f} s",
              file=sys.stderr, flush=True)
    return {"times": times, "warmup": warmup, "peak": peak}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="imfuse", choices=sorted(PAPER))
    parser.add_argument("--resume", help="a trained checkpoint (default: the paper configuration, random weights)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=3, default=(240, 240, 155), metavar=("X", "Y", "Z"))
    parser.add_argument("--missing", nargs="*", default=[], choices=MODALITIES, help="sequences left out")
    parser.add_argument("--one_path", nargs=4, metavar=("PATH", "CKPT", "INPUTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_path:  # the child process of one path: its figures as JSON on stdout
        name, ckpt, inputs, out_dir = args.one_path
        print(json.dumps(run_path(name, ckpt, json.loads(inputs), out_dir, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        files = modality_files(str(make_case(tmp, 0, seed=0, size=tuple(args.size))))
        inputs = [arg for flag, path in zip(MODALITIES, files) if flag not in args.missing
                  for arg in (f"--{flag}", path)]
        ckpt = args.resume
        if not ckpt:
            torch.manual_seed(0)
            ckpt = os.path.join(tmp, "model.pth")
            config = PAPER[args.model]
            save_checkpoint(ckpt, {"model": args.model, "config": config, "epoch": 0,
                                   "state_dict": build_model(args.model, **config).state_dict()})
        print(f"{args.model} ({'random weights' if not args.resume else ckpt}), case {'x'.join(map(str, args.size))}"
              f"{', without ' + ' '.join(args.missing) if args.missing else ''}, {torch.get_num_threads()} threads",
              flush=True)
        figures = {}
        for name in PATHS:
            out_dir = os.path.join(tmp, name)
            os.makedirs(out_dir)
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            if name == "fused":  # as predict.py restarts itself (utils/memory.py)
                env["GLIBC_TUNABLES"] = TCACHE_OFF
            child = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--one_path", name,
                                    ckpt, json.dumps(inputs), out_dir], stdout=subprocess.PIPE, text=True, env=env)
            if child.returncode:
                sys.exit(f"bench_case.py: the {name} path failed (exit status {child.returncode})")
            figures[name] = json.loads(child.stdout.strip().splitlines()[-1])
        for name, fig in figures.items():
            print(f"{name:9s}: median {statistics.median(fig['times']):6.1f} s over {len(fig['times'])} runs "
                  f"({', '.join(f'{t:.1f}' for t in fig['times'])}; warm-up {fig['warmup']:.1f}); "
                  f"peak RSS {fig['peak'] / 2 ** 30:.2f} GiB")
        ratio = statistics.median(figures["reference"]["times"]) / statistics.median(figures["fused"]["times"])
        print(f"ratio reference / fused: {ratio:.2f}")
        labels = {n: np.asarray(nib.load(os.path.join(tmp, n, "seg.nii.gz")).dataobj) for n in PATHS}
        probs = {n: np.asarray(nib.load(os.path.join(tmp, n, "seg_probabilities.nii.gz")).dataobj) for n in PATHS}
        agreement = ", ".join(f"{region} {dice(np.isin(labels['reference'], v), np.isin(labels['fused'], v)):.6f}"
                              for region, v in REGIONS.items())
        print(f"agreement of the labels (Dice): {agreement}; voxels that differ "
              f"{int((labels['reference'] != labels['fused']).sum())}; largest probability difference "
              f"{float(np.abs(probs['reference'] - probs['fused']).max()):.2e}")


if __name__ == "__main__":
    main()
