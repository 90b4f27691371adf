"""Seconds per training step and peak memory of a model (the GPU figures of the README).

    python benchmarks/bench_train_step.py [--model imfuse] [--device cuda] [--patch-size 128 |
        --window X Y Z] [--model_args JSON] [--amp] [--scan torch|mamba_ssm|numba|auto] [--steps 5]

One step is what train_poly.py does per iteration: forward in train mode (fused, auxiliary
and deep-supervision outputs), the model's loss, backward, the recipe's gradient clipping and
a step of its optimiser, batch 1, a random modality subset. Defaults: IM-Fuse in the paper configuration. Prints the median over the
steps after two warm-up steps, and the peak memory: allocated by torch on CUDA, the process's
resident set on the CPU.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import build_model  # noqa: E402
from engine.training import optimizer_parameters  # noqa: E402
from models.scan import BACKENDS, ENV_VAR  # noqa: E402
from utils.brats import SUBSETS  # noqa: E402
from utils.schedule import make_optimizer  # noqa: E402

PAPER = {"imfuse": dict(interleaved=True, mamba_skip=True), "mmformer": {}, "robustseg": {}, "sfusion": {},
         "shaspec": {}, "uhved": {}, "mam": {}, "m3ae": {}}


def step_times(model, device, amp=False, steps=5, warmup=2):
    """Seconds of each of `steps` training steps (after `warmup` more) of `model` (built, on
    `device`) on random inputs, batch 1, and the peak memory in bytes (allocated by torch on
    CUDA, the process's resident set on the CPU)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    model.train()
    optimizer = make_optimizer(model.recipe, optimizer_parameters(model, model.recipe))
    x = torch.randn(1, 4, *model.window, device=device)
    label = torch.randint(0, 4, (1, *model.window), device=device)
    grid = [torch.tensor([[[0, 1]] * 3], device=device)] if getattr(model, "uses_position", False) else []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + warmup):
        mask = torch.tensor([SUBSETS[i % len(SUBSETS)]], device=device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = model.loss(model(x, mask, *grid), {"image": x, "label": label, "mask": mask})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if model.recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), model.recipe.grad_clip)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return times[warmup:], peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="imfuse", choices=sorted(PAPER))
    p.add_argument("--patch-size", type=int, help="cubic models (default: the model's)")
    p.add_argument("--window", type=int, nargs=3, metavar=("X", "Y", "Z"), help="models with a `window`")
    p.add_argument("--model_args", type=json.loads, default={}, help="other constructor arguments (JSON)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--scan", choices=("auto",) + BACKENDS, default="auto", help="selective-scan backend")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    os.environ[ENV_VAR] = args.scan
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    size = dict(window=tuple(args.window)) if args.window else \
        dict(patch_size=args.patch_size) if args.patch_size else {}
    model = build_model(args.model, **size, **PAPER[args.model], **args.model_args).to(device)
    times, peak = step_times(model, device, args.amp, args.steps)
    if cuda:
        peak = f"peak allocated {peak / 2 ** 30:.1f} GiB ({torch.cuda.get_device_name(device)})"
    else:
        peak = f"peak RSS {peak / 2 ** 30:.1f} GiB ({torch.get_num_threads()} threads)"
    print(f"{args.model} {PAPER[args.model]} {args.model_args or ''}, window {'x'.join(map(str, model.window))}, {device}, {'bf16 autocast' if args.amp else 'float32'}, "
          f"scan {args.scan}: median {statistics.median(times):.3f} s per training step over {len(times)} "
          f"(min {min(times):.3f} s); {peak}")


if __name__ == "__main__":
    main()
