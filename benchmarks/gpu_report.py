"""Every GPU figure of the README in one run: writes gpu_report.md and gpu_report.json.

    python benchmarks/gpu_report.py [--out gpu_report] [--steps 5] [--models imfuse mam ...]
    python benchmarks/gpu_report.py --dry-run      # the same code paths, tiny sizes, on the CPU

On one CUDA GPU (under 8 minutes on an H100) it measures:
  1. one training step of every registered model at its paper configuration (batch 1, a
     different modality subset each step), float32 and bf16 autocast: median seconds over
     --steps after two warm-up steps, and peak memory (torch.cuda.max_memory_allocated);
  2. IM-Fuse with each selective-scan backend that is available here (mamba_ssm, triton,
     torch), the same weights and inputs, their outputs and losses checked against each other;
  3. the selective scan alone, forward + backward, at the largest (length, d_inner, d_state)
     of IM-Fuse's Mamba layers in that configuration, per backend, and their ratios;
  4. one full-size synthetic case (240 x 240 x 155, four sequences) through predict.py with an
     IM-Fuse checkpoint of random weights: seconds and peak memory;
  5. the training data loader's samples per second with train_poly.py's default workers,
     against the rate of IM-Fuse's training steps (whether the GPU waits for data).
What is unavailable is skipped with a line saying why. Without CUDA it refuses to run, in one
line, unless --dry-run, which runs everything at tiny sizes on the CPU (for CI).
"""
import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # Triton's interpreter (CPU tensors) is chosen when triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_loader import rate as loader_rate  # noqa: E402
from bench_train_step import PAPER, step_times  # noqa: E402

from engine import build_model  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from models import list_models  # noqa: E402
from models.mamba import Mamba  # noqa: E402
from models.scan import BACKENDS, ENV_VAR, backend_available, selective_scan  # noqa: E402
from utils.brats import SUBSETS  # noqa: E402

TRAINING_WORKERS = 2  # train_poly.py's default --num_workers
# --dry-run: tiny configurations of every model (CPU), the case and loader sizes, and the
# largest scan (length, d_inner) that Triton's interpreter runs in seconds
DRY = dict(size=(48, 48, 40), patch=32, steps=2, scan=(300, 4))


def dry_config(name):
    """The model's small configuration (engine/small.py) for --dry-run."""
    from engine.models import model_class
    return dict(getattr(model_class(name), "small_config", {}))


def paper_config(name):
    return dict(PAPER.get(name, {}))


def gib(nbytes):
    return round(nbytes / 2 ** 30, 2)


def log(line):
    print(line, flush=True)


def training_steps(names, device, config, steps):
    rows = []
    for name in names:
        for amp in (False, True):
            row = {"model": name, "precision": "bf16 autocast" if amp else "float32"}
            try:
                torch.manual_seed(0)
                model = build_model(name, **config(name)).to(device)
                row["window"] = "x".join(map(str, model.window))
                row["parameters"] = sum(p.numel() for p in model.parameters())
                times, peak = step_times(model, device, amp, steps)
                row.update(seconds=round(statistics.median(times), 4), peak_gib=gib(peak))
            except torch.cuda.OutOfMemoryError:
                row["skipped"] = "out of GPU memory"
            except Exception as err:  # a model that fails must not stop the report
                row["skipped"] = f"{type(err).__name__}: {err}"
            finally:
                model = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(f"  train step {name} {row['precision']}: "
                + (f"{row['seconds']:.3f} s, peak {row['peak_gib']} GiB" if "seconds" in row else row["skipped"]))
            rows.append(row)
    return rows


def available_backends(device):
    found, skipped = [], {}
    for name in BACKENDS:
        ok, reason = backend_available(name, device)
        if ok:
            found.append(name)
        else:
            skipped[name] = reason
    return found, skipped


def scan_shapes(model, x, mask):
    """(length, d_inner, d_state) of every Mamba layer in one forward pass of `model`."""
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: shapes.append((args[0].shape[1], mod.d_inner, mod.d_state)))
             for m in model.modules() if isinstance(m, Mamba)]
    with torch.no_grad():
        model(x, mask)
    for h in hooks:
        h.remove()
    return shapes


def imfuse_backends(device, config, steps, backends):
    """Training step per backend (same weights), outputs and losses against the first."""
    rows, reference = [], None
    torch.manual_seed(0)
    base = build_model("imfuse", **config("imfuse"))
    x = torch.randn(1, 4, *base.window, device=device)
    mask = torch.tensor([SUBSETS[-1]], device=device)
    shapes = scan_shapes(base.to(device).eval(), x, mask)
    for name in backends:
        if name == "numba" and device.type == "cuda":
            continue
        os.environ[ENV_VAR] = name
        row = {"backend": name}
        try:
            model = build_model("imfuse", **config("imfuse")).to(device)
            model.load_state_dict(base.state_dict())
            model.eval()
            with torch.no_grad():
                out = model(x, mask).float()
            if reference is None:
                reference, first, row["max_abs_difference"] = out, name, 0.0
            else:
                row["max_abs_difference"] = float((out - reference).abs().max())
            times, peak = step_times(model, device, False, steps)
            row.update(seconds=round(statistics.median(times), 4), peak_gib=gib(peak))
        except torch.cuda.OutOfMemoryError:
            row["skipped"] = "out of GPU memory"
        finally:
            os.environ.pop(ENV_VAR, None)
        log(f"  imfuse, scan {name}: " + (f"{row['seconds']:.3f} s per step, outputs differ from "
                                          f"{first}'s by {row['max_abs_difference']:.1e}"
                                          if "seconds" in row else row["skipped"]))
        rows.append(row)
    return rows, shapes


def scan_alone(device, shape, backends, reps):
    """Forward + backward of the scan at (length, d_inner, d_state), batch 1, float32."""
    L, d, n = shape
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    inputs = [r(1, d, L), r(1, d, L), -torch.exp(r(d, n)), r(1, n, L), r(1, n, L), r(d), r(1, d, L), r(d)]
    for t in inputs:
        t.requires_grad_()
    grad = r(1, d, L)
    rows = []
    for name in backends:
        if name == "numba" and device.type == "cuda":
            continue
        times = []
        for i in range(reps + 1):
            for t in inputs:
                t.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = selective_scan(*inputs, delta_softplus=True, backend=name)
            out.backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows.append({"backend": name, "seconds": round(statistics.median(times[1:]), 4)})
        log(f"  scan {name} at length {L:,}, d_inner {d}, d_state {n}: {rows[-1]['seconds']:.4f} s fwd+bwd")
    for row in rows:
        row["vs_torch"] = round(next(r["seconds"] for r in rows if r["backend"] == "torch") / row["seconds"], 2)
    return rows


def full_case(device, size, config, tmp):
    """predict.py on one synthetic case of `size` with an IM-Fuse checkpoint of random weights."""
    import predict
    from data.synthetic import make_cohort
    make_cohort(f"{tmp}/raw", 1, seed=0, size=size)
    case = next(Path(tmp, "raw").iterdir())
    torch.manual_seed(0)
    model = build_model("imfuse", **config("imfuse"))
    ckpt = f"{tmp}/imfuse.pth"
    save_checkpoint(ckpt, {"model": "imfuse", "config": config("imfuse"), "state_dict": model.state_dict(), "epoch": 0})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        code = predict.main(["--resume", ckpt, "--input", str(case), "--output", f"{tmp}/seg.nii.gz",
                             "--device", str(device)])
    seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"predict.py exited with {code}")
    row = {"case": "x".join(map(str, size)), "seconds": round(seconds, 2)}
    if device.type == "cuda":
        row["peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
    log(f"  predict.py, one {row['case']} case: {row['seconds']:.1f} s"
        + (f", peak {row['peak_gib']} GiB" if "peak_gib" in row else ""))
    return row


def loader(size, patch, tmp, step_seconds, samples):
    from data.preprocessing import preprocess_all
    from data.synthetic import make_cohort
    make_cohort(f"{tmp}/lraw", 4, seed=1, size=size, workers=2)
    preprocess_all(f"{tmp}/lraw", f"{tmp}/lout", workers=2, min_size=patch, progress=False)
    cases = sorted(p.name[:-len("_vol.npy")] for p in Path(tmp, "lout", "vol").iterdir())
    per_second = loader_rate(f"{tmp}/lout", cases, patch, samples, TRAINING_WORKERS)
    row = {"workers": TRAINING_WORKERS, "patch": patch, "samples_per_second": round(per_second, 2)}
    if step_seconds:
        row["training_steps_per_second"] = round(1 / step_seconds, 2)
        row["loader_over_steps"] = round(per_second * step_seconds, 2)
    log(f"  loader, {TRAINING_WORKERS} workers, patch {patch}: {per_second:.2f} samples/s"
        + (f" against {row['training_steps_per_second']} IM-Fuse steps/s" if step_seconds else ""))
    return row


def markdown(report):
    lines = [f"# GPU report ({report['device']})", "",
             f"torch {report['torch']}, triton {report['triton']}, mamba-ssm {report['mamba_ssm']}; "
             f"{report['date']}" + ("; **dry run on the CPU at tiny sizes: not GPU figures**" if report["dry_run"] else ""), ""]
    for name, reason in report["backends_skipped"].items():
        lines.append(f"- scan backend {name} skipped: {reason}")
    lines += ["", "## Training step (batch 1)", "", "| model | window | parameters | precision | s / step | peak GiB |",
              "|---|---|---|---|---|---|"]
    for r in report["train_steps"]:
        params = f"{r['parameters']:,}" if "parameters" in r else ""
        lines.append(f"| {r['model']} | {r.get('window', '')} | {params} | {r['precision']} | "
                     + (f"{r['seconds']:.3f} | {r['peak_gib']} |" if "seconds" in r else f"{r['skipped']} | |"))
    lines += ["", "## IM-Fuse per scan backend (float32)", "", "| backend | s / step | peak GiB | max abs output difference |",
              "|---|---|---|---|"]
    for r in report["imfuse_backends"]:
        lines.append(f"| {r['backend']} | " + (f"{r['seconds']:.3f} | {r['peak_gib']} | {r['max_abs_difference']:.1e} |"
                                              if "seconds" in r else f"{r['skipped']} | | |"))
    L, d, n = report["scan_shape"]
    lines += ["", f"## Selective scan alone, forward + backward (length {L:,}, d_inner {d}, d_state {n})", "",
              "| backend | s | speed-up over torch |", "|---|---|---|"]
    lines += [f"| {r['backend']} | {r['seconds']:.4f} | {r['vs_torch']:.1f}x |" for r in report["scan"]]
    c = report["predict"]
    lines += ["", "## predict.py, one case", "", f"{c['case']}, four sequences: {c['seconds']:.1f} s"
              + (f", peak {c['peak_gib']} GiB" if "peak_gib" in c else "")]
    d = report["loader"]
    lines += ["", "## Data loader", "", f"{d['samples_per_second']} samples/s with {d['workers']} workers at patch "
              f"{d['patch']}" + (f", against {d['training_steps_per_second']} IM-Fuse training steps/s (ratio "
                                 f"{d['loader_over_steps']}; below 1 the GPU waits for data)" if "loader_over_steps" in d else "")]
    return "\n".join(lines) + "\n"


def write(path, text):
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def version(module):
    try:
        return __import__(module).__version__
    except Exception as err:
        return f"not importable ({type(err).__name__})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_report", help="output path without extension (default gpu_report)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per figure (default 5)")
    p.add_argument("--models", nargs="+", help="models of the training-step table (default: all registered)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, to check the code paths")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_report.py: no CUDA device here (torch.cuda.is_available() is False); "
                 "--dry-run checks the code paths on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    config = dry_config if args.dry_run else paper_config
    steps = DRY["steps"] if args.dry_run else max(args.steps, 5)
    size = DRY["size"] if args.dry_run else (240, 240, 155)
    names = args.models or list_models()
    report = {"device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device),
              "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": version("triton"), "mamba_ssm": version("mamba_ssm"), "python": platform.python_version()}
    backends, report["backends_skipped"] = available_backends(device)
    for name, reason in report["backends_skipped"].items():
        log(f"scan backend {name} skipped: {reason}")
    log("1. training steps")
    report["train_steps"] = training_steps(names, device, config, steps)
    log("2. IM-Fuse per scan backend")
    in_model = backends
    if args.dry_run and "triton" in backends:  # about 35 ms per block of 64 steps in the interpreter
        in_model = [b for b in backends if b != "triton"]
        log("  imfuse, scan triton: skipped in the dry run (Triton's interpreter takes minutes per "
            "forward pass); section 3 runs its kernels")
    report["imfuse_backends"], shapes = imfuse_backends(device, config, steps, in_model)
    L, d, n = max(shapes)
    report["scan_shape"] = (min(L, DRY["scan"][0]), min(d, DRY["scan"][1]), n) if args.dry_run else (L, d, n)
    log("3. selective scan alone")
    report["scan"] = scan_alone(device, report["scan_shape"], backends, steps)
    with tempfile.TemporaryDirectory() as tmp:
        log("4. predict.py on one case")
        report["predict"] = full_case(device, size, config, tmp)
        log("5. data loader")
        step = next((r["seconds"] for r in report["train_steps"]
                     if r["model"] == "imfuse" and r["precision"] == "float32" and "seconds" in r), None)
        patch = DRY["patch"] if args.dry_run else build_model("imfuse", **config("imfuse")).window[0]
        report["loader"] = loader(size, patch, tmp, step, samples=4 if args.dry_run else 24)
    write(f"{args.out}.json", json.dumps(report, indent=1) + "\n")
    write(f"{args.out}.md", markdown(report))
    log(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
