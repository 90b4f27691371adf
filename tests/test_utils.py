"""Losses, learning-rate schedules, recipes, BraTS metrics and sliding-window inference
against hand-computed values and independent definitions."""
import csv
import itertools
import math
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

import competitors  # noqa: F401  (registers the competitors)
from helpers import ROOT
from engine.inference import select_device, sliding_window, window_starts
from engine.models import model_class
from models import build_model
from utils.amp import guard_cpu_bf16_convs
from utils.io import write_csv
from utils.losses import one_hot, region_targets, segmentation_loss, soft_dice_loss, weighted_cross_entropy
from utils.metrics import HD95_ONE_EMPTY, brats_metrics, hd95
from utils.recipe import Recipe
from utils.schedule import LRSchedule, make_optimizer


def probs(*columns):
    """(1, K, N, 1, 1) probabilities from per-voxel class columns."""
    return torch.tensor(columns, dtype=torch.float64).t()[None, :, :, None, None]


def test_weighted_cross_entropy_by_hand():
    p = probs([0.8, 0.2], [0.3, 0.7], [0.999, 0.001])  # 3 voxels, 2 classes
    label = torch.tensor([0, 1, 1])[None, :, None, None]
    t = one_hot(label, 2).double()
    w0, w1 = 1 - 1 / 3, 1 - 2 / 3  # class 0 has 1 of 3 voxels, class 1 has 2
    want = (-w0 * math.log(0.8) - w1 * math.log(0.7) - w1 * math.log(0.005)) / 3  # 0.001 clamped
    assert weighted_cross_entropy(p, t).item() == pytest.approx(want, rel=1e-12)


def test_soft_dice_by_hand_sums_over_the_batch():
    p = torch.tensor([[[0.8, 0.3]], [[0.4, 0.9]]], dtype=torch.float64)  # (B=2, 1, 2) class 1
    p = torch.cat([1 - p, p], dim=1)[..., None, None]  # (2, 2, 2, 1, 1)
    label = torch.tensor([[0, 1], [1, 1]])[..., None, None]
    t = one_hot(label, 2).double()
    inter1 = 0.3 + 0.4 + 0.9
    inter0 = 0.2
    d1 = 2 * inter1 / (0.8 + 0.3 + 0.4 + 0.9 + 3 + 1e-7)
    d0 = 2 * inter0 / (0.2 + 0.7 + 0.6 + 0.1 + 1 + 1e-7)
    assert soft_dice_loss(p, t).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-12)
    assert segmentation_loss(p, label).item() == pytest.approx(
        weighted_cross_entropy(p, t).item() + soft_dice_loss(p, t).item(), rel=1e-12)


def test_imfuse_loss_sums_every_output():
    gen = torch.Generator().manual_seed(0)
    outs = [torch.rand(1, 4, 4, 4, 4, generator=gen).softmax(1) for _ in range(9)]
    label = torch.randint(0, 4, (1, 4, 4, 4), generator=gen)
    model = build_model("imfuse", patch_size=16, width=1, dim=4, heads=1, mlp_dim=4)
    total, parts = model.loss((outs[0], outs[1:5], outs[5:]), {"label": label})
    want = sum(segmentation_loss(o, label) for o in outs)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert parts["fused"].item() == pytest.approx(segmentation_loss(outs[0], label).item())
    assert set(parts) == {"fused", "aux", "deep"}


def test_region_targets_by_hand():
    label = torch.tensor([[0, 1, 2, 3]])
    assert region_targets(label)[0].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]  # WT, TC, ET


def lrs(recipe, epochs, iters, groups=(1.0,)):
    """The lr of every group at every iteration of a run, as LRSchedule sets them."""
    params = [{"params": [torch.zeros(1, requires_grad=True)], "lr": recipe.lr * g} for g in groups]
    optimizer = make_optimizer(recipe, params)
    schedule = LRSchedule(optimizer, recipe, iters)
    out = []
    for e in range(epochs):
        schedule.start_epoch(e)
        for i in range(iters):
            schedule.start_iteration(e, i)
            out.append([group["lr"] for group in optimizer.param_groups])
    return out


def test_schedules_against_their_formulas():
    E, I, lr = 5, 3, 2e-4
    poly_e = lrs(Recipe(lr=lr, num_epochs=E), E, I)
    assert poly_e == [[lr * (1 - (k // I) / E) ** 0.9] for k in range(E * I)]  # the same at every iteration of an epoch
    poly_i = lrs(Recipe(lr=lr, num_epochs=E, schedule="poly_iteration", schedule_args={"power": 2.0}), E, I)
    assert [g[0] for g in poly_i] == pytest.approx([lr * (1 - k / (E * I)) ** 2 for k in range(E * I)], rel=1e-12)
    cos = lrs(Recipe(lr=lr, num_epochs=E, schedule="cosine"), E, I, groups=(1.0, 10.0))
    for k, (a, b) in enumerate(cos):  # every group scaled alike
        want = lr * (1 + math.cos(math.pi * (k // I) / E)) / 2
        assert a == pytest.approx(want, rel=1e-12) and b == pytest.approx(10 * want, rel=1e-12)
    # torch's own cosine annealing, stepped per epoch, agrees
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    torch_cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, E)
    for e in range(E):
        assert cos[e * I][0] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        torch_cos.step()
    assert lrs(Recipe(lr=lr, schedule="constant"), 2, 2) == [[lr]] * 4


def test_plateau_follows_the_validation_score_and_resumes():
    recipe = Recipe(lr=1.0, optimizer="adam", schedule="plateau", schedule_args={"patience": 1, "factor": 0.5})
    optimizer = make_optimizer(recipe, [torch.zeros(1, requires_grad=True)])
    schedule = LRSchedule(optimizer, recipe, 10)
    got = [schedule.validated(score) for score in (0.5, 0.6, 0.6, 0.6, 0.7, 0.7)]
    assert got == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]  # two checks without gain halve it (patience 1)
    assert schedule.start_epoch(3) == 0.5  # the epoch boundary leaves it alone
    resumed = LRSchedule(make_optimizer(recipe, [torch.zeros(1, requires_grad=True)]), recipe, 10)
    resumed.optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.validated(0.7) == schedule.validated(0.7) == 0.25


def test_optimizers_take_their_arguments():
    p = [torch.zeros(1, requires_grad=True)]
    adam = make_optimizer(Recipe(optimizer="adam", optimizer_args={"amsgrad": True}, lr=1e-3, weight_decay=1e-5), p)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["amsgrad"]
    assert adam.param_groups[0]["weight_decay"] == 1e-5 and adam.param_groups[0]["initial_lr"] == 1e-3
    sgd = make_optimizer(Recipe(optimizer="sgd", optimizer_args={"momentum": 0.99, "nesterov": True}), p)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    assert sgd.param_groups[0]["momentum"] == 0.99


@pytest.mark.parametrize("change,needle", [
    ({"optimizer": "lion"}, "optimizer 'lion'"), ({"schedule": "cosine", "schedule_args": {"power": 1}}, "takes no power"),
    ({"subset_weights": (1,) * 14}, "15 non-negative"), ({"subset_weights": (0,) * 15}, "not all zero"),
    ({"augmentations": ("elastic",)}, "unknown augmentation 'elastic'"), ({"batch_size": 0}, "batch_size"),
    ({"foreground_oversampling": 1.5}, "foreground_oversampling"), ({"optimizer_args": {"foo": 1}}, "radam takes no foo"),
    ({"val_every": 0}, "val_every"), ({"val_every": (5, 3)}, "increasing"), ({"val_every": (2, 2)}, "increasing"),
    ({"val_every": ()}, "val_every"), ({"val_every": (0, 4)}, "val_every")])
def test_recipe_refuses_bad_values_in_one_line(change, needle):
    with pytest.raises(ValueError, match="recipe: ") as err:
        Recipe(**change)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("values,needle", [
    ({"optimizer": "sgd", "optimizer_args": {"momentum": -1.0}}, "sgd with {'momentum': -1.0}: Invalid momentum"),
    ({"optimizer": "adam", "optimizer_args": {"betas": [0.9]}}, "adam with {'betas': [0.9]}"),
    ({"schedule": "plateau", "schedule_args": {"factor": 2.0}}, "plateau with {'factor': 2.0}"),
    ({"schedule": "plateau", "schedule_args": {"patience": "a"}}, "plateau with {'patience': 'a'}"),  # fails when stepped
    ({"schedule_args": {"power": "a"}}, "power must be a positive number")])
def test_bad_optimizer_and_schedule_values_are_refused_by_the_recipe_check(values, needle):
    with pytest.raises(ValueError, match="recipe: ") as err:
        Recipe(**values).check()
    assert needle in str(err.value)


def test_every_registered_recipe_passes_its_check_and_none_imports_torch_dynamo():
    """Recipes are built when the models are imported (predict.py, test.py): building them must
    not construct an optimiser (torch._dynamo's import, ~1 s); check() still tries the values."""
    code = ("import sys, engine, models\n"
            "assert 'torch._dynamo' not in sys.modules, 'a recipe built an optimiser at import'\n"
            "for name in models.list_models():\n"
            "    cls = models.model_class(name)\n"
            "    for r in [getattr(cls, 'recipe', None), *getattr(cls, 'recipes', {}).values()]:\n"
            "        r and r.check()\n"
            "assert 'torch._dynamo' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_recipe_round_trip_through_a_checkpoint(tmp_path):
    recipe = Recipe(optimizer="sgd", optimizer_args={"nesterov": True, "momentum": 0.9}, subset_weights=tuple(range(1, 16)),
                    augmentations=("flip",), iter_per_epoch=7)
    torch.save(recipe.as_dict(), tmp_path / "r.pth")
    assert Recipe.from_dict(torch.load(tmp_path / "r.pth", weights_only=True)) == recipe
    with pytest.raises(ValueError, match="unknown field 'crop'"):
        Recipe.from_dict({"crop": 3})


def surface_points(mask):
    """Voxels of mask with a 6-neighbour outside it (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis, shift in itertools.product(range(3), (-1, 1)):
        inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner)


def brute_hd95(a, b, spacing):
    pa, pb = surface_points(a) * spacing, surface_points(b) * spacing
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_single_voxels_and_spacing():
    a = np.zeros((12, 12, 12), bool)
    b = a.copy()
    a[2, 5, 5] = b[5, 5, 5] = True
    assert hd95(a, b) == 3.0
    assert hd95(a, b, spacing=(2, 1, 1)) == 6.0


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (20, 18, 16)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[3:12, 4:10, 2:9] = True
    b[5:15, 3:12, 4:14] = True
    a ^= rng.random(shape) < 0.05
    spacing = np.array([1.0, 1.5, 2.0])
    assert hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-9)


def test_brats_metrics_by_hand():
    target = np.zeros((30, 30, 30), np.uint8)
    target[5:15, 5:15, 5:15] = 2          # 1000 voxels oedema
    target[8:12, 8:12, 8:12] = 3          # 64 ET
    target[9:11, 9:11, 9:11] = 1          # 8 NCR (inside ET block)
    pred = np.zeros_like(target)
    pred[5:15, 5:15, 5:10] = 2            # 500 voxels of WT
    pred[8:12, 8:12, 8:10] = 3            # 32 voxels of ET
    m = brats_metrics(pred, target)
    assert m["WT"] == pytest.approx(2 * 500 / (500 + 1000))
    tc_t = 64  # NCR voxels replaced ET voxels: TC = ET block
    assert m["TC"] == pytest.approx(2 * 32 / (32 + tc_t))
    et_t = 64 - 8
    inter = 32 - 4  # predicted ET z 8-9 meets NCR at [9:11, 9:11, 9]: 4 voxels
    assert m["ET"] == pytest.approx(2 * inter / (32 + et_t))
    assert m["ETpp"] == pytest.approx(0.0, abs=1e-9)  # 32 < 500 predicted ET voxels: removed
    assert set(m) == {"WT", "TC", "ET", "ETpp", "HD95_WT", "HD95_TC", "HD95_ET"}
    assert brats_metrics(pred, target, distances=False) == {k: m[k] for k in ("WT", "TC", "ET", "ETpp")}


def test_brats_metrics_empty_regions():
    empty = np.zeros((20, 20, 20), np.uint8)
    m = brats_metrics(empty, empty)
    assert m["WT"] == m["TC"] == m["ET"] == m["ETpp"] == 1.0
    assert m["HD95_WT"] == m["HD95_ET"] == 0.0
    target = empty.copy()
    target[5:9, 5:9, 5:9] = 2
    m = brats_metrics(empty, target)
    assert m["WT"] == pytest.approx(0.0, abs=1e-9) and m["HD95_WT"] == HD95_ONE_EMPTY
    assert m["ET"] == 1.0 and m["HD95_ET"] == 0.0  # no ET anywhere
    small_et = empty.copy()
    small_et[2:4, 2:4, 2:4] = 3  # an ET false positive under 500 voxels
    m = brats_metrics(small_et, empty)
    assert m["ET"] == pytest.approx(1e-8 / 8, rel=1e-6) and m["ETpp"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        brats_metrics(empty, empty[:10])


def test_window_starts_by_hand():
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(37, 16, 8) == [0, 8, 16, 21]
    assert window_starts(16, 16, 8) == [0]


@pytest.mark.parametrize("window", [16, (16, 8, 12)])
@pytest.mark.parametrize("dims", [(40, 37, 33), (16, 16, 16), (10, 20, 17)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_window_reproduces_the_identity_and_covers_every_voxel(dims, batch_size, window):
    volume = torch.randn(4, *dims, dtype=torch.float64)
    size = (window,) * 3 if isinstance(window, int) else window
    calls = []

    def identity(windows):  # (B, M, *window) -> (B, S=2, K=M, *window)
        calls.append(windows.shape)
        return torch.stack([windows, 2 * windows], dim=1)

    out = sliding_window(volume, window, identity, batch_size=batch_size)
    assert out.shape == (2, 4, *dims)
    torch.testing.assert_close(out[0], volume, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], 2 * volume, rtol=0, atol=1e-12)
    n_windows = 1
    for d, w in zip(dims, size):
        n_windows *= len(window_starts(max(d, w), w, w // 2))  # stride half the window per axis
    assert sum(shape[0] for shape in calls) == n_windows
    assert all(shape[1:] == (4, *size) and shape[0] <= batch_size for shape in calls)
    ones = sliding_window(torch.ones(1, *dims), window, lambda w: torch.ones_like(w)[:, None],
                          batch_size=batch_size)
    assert torch.equal(ones, torch.ones(1, 1, *dims))  # uniform average: the weights sum to 1


def test_anisotropic_window_starts_by_hand():
    x, y, z = torch.meshgrid(torch.arange(20), torch.arange(10), torch.arange(9), indexing="ij")
    volume = (10000 * x + 100 * y + z)[None].double()  # each voxel holds its coordinates
    starts = []

    def record(windows):
        starts.extend(int(v) for v in windows[:, 0, 0, 0, 0])
        return windows[:, None]

    sliding_window(volume, (8, 10, 4), record, batch_size=5)
    # x: stride 4, last flush at 12; y: one window; z: stride 2, last flush at 5
    assert sorted(starts) == sorted(10000 * a + c for a in (0, 4, 8, 12) for c in (0, 2, 4, 5))


def test_first_line_of_an_error_message():
    from utils.errors import first_line
    assert first_line(ValueError("\n  bad header\nmore detail")) == "bad header"
    assert first_line(KeyError()) == "KeyError"  # an empty message: the type, not an IndexError
    assert first_line(OSError("x" * 500), limit=10) == "x" * 10


def test_csv_floats_read_back_exactly_and_formats_apply_per_column(tmp_path):
    values = [1 / 3, 0.1 + 0.2, np.float64(2 / 7), 1e-300, 373.12866]
    rows = [{"x": v, "p": 2e-12 * (i + 1), "name": f"r{i}", "n": i} for i, v in enumerate(values)]
    write_csv(tmp_path / "t.csv", rows, ["name", "x", "p", "n"], formats={"p": ".2e"})
    with open(tmp_path / "t.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert [float(r["x"]) for r in back] == [float(v) for v in values]  # no rounding, no 'np.float64(...)'
    assert [r["p"] for r in back] == ["2.00e-12", "4.00e-12", "6.00e-12", "8.00e-12", "1.00e-11"]
    assert [r["n"] for r in back] == ["0", "1", "2", "3", "4"] and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("depth", [2, 4])
def test_guarded_convs_give_the_float32_weight_gradient_at_depth_2_and_keep_bf16_elsewhere(depth):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(32, 8, 3, padding=1)
    assert guard_cpu_bf16_convs(torch.nn.Sequential(conv, torch.nn.ReLU())) == 1
    x = torch.randn(1, 32, depth, 4, 4)
    g = torch.randn(1, 8, depth, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        with torch.no_grad():
            assert conv(x).dtype == torch.bfloat16  # inference keeps bf16
    (y.float() * g).sum().backward()
    assert y.dtype == (torch.float32 if depth == 2 else torch.bfloat16)
    w = conv.weight.detach().clone().requires_grad_()
    if depth == 2:  # float32 throughout: the float32 gradient, exactly as F.conv3d gives it
        ref = torch.nn.functional.conv3d(x, w, conv.bias.detach(), padding=1)
    else:  # bf16 inputs and weights, float32 sums
        ref = torch.nn.functional.conv3d(x.bfloat16().float(), w.bfloat16().float(), conv.bias.detach(), padding=1)
    (ref * g).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if depth == 2 else dict(rtol=0.05, atol=0.05 * float(w.grad.abs().max()))
    torch.testing.assert_close(conv.weight.grad, w.grad, **tol)


def test_select_device_turns_on_cudnn_benchmarking_only_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert select_device("cpu") == torch.device("cpu") and torch.backends.cudnn.benchmark is False
    assert select_device("cuda:0") == torch.device("cuda", 0) and torch.backends.cudnn.benchmark is True


def test_validation_after_every_n_th_epoch_or_the_listed_ones_and_always_the_last():
    every = Recipe(num_epochs=10, val_every=4)
    assert [e for e in range(1, 11) if every.validates_after(e)] == [4, 8, 10]
    listed = Recipe(num_epochs=10, val_every=[2, 3, 12])  # a list (JSON, a checkpoint) is read as a tuple
    assert listed.val_every == (2, 3, 12) and [e for e in range(1, 11) if listed.validates_after(e)] == [2, 3, 10]
    imfuse = Recipe()
    assert sum(map(imfuse.validates_after, range(1, 1001))) == 27 and imfuse.validates_after(50)


@pytest.mark.parametrize("spec,count", [("imfuse", 27), ("mmformer", 27), ("robustseg", 25), ("sfusion", 17),
                                        ("uhved", 41), ("shaspec", 33), ("mam", 22), ("m3ae", 18)])
def test_each_model_validates_as_often_as_its_original(spec, count):
    recipe = getattr(model_class(spec), "recipes", {}).get("finetune") or model_class(spec).recipe
    epochs = [e for e in range(1, recipe.num_epochs + 1) if recipe.validates_after(e)]
    assert len(epochs) == count and epochs[-1] == recipe.num_epochs
    if spec == "shaspec":  # the original's iterations (thousands; warm-up, then main from the warm-up's start)
        iterations = [15, 30, 65, 100, 135, 170, 205, 220, 235, 240, 245, 110, 120, 130, 150, 170, 180, 190, 200,
                      210, 220, 230, 250, 270, 290, 310, 320, 330, 340, 350, 360, 370, 380, 390, 406]
        assert epochs == sorted({math.ceil(k * 1000 / 875) for k in iterations})
    if spec == "mam":  # nnU-Net counts epochs from 0
        assert epochs == [e + 1 for e in (20, 50, 70, 100, 120, 150, 200, 250, 300, 350, 370, 390, 400, 420, 450,
                                          460, 470, 480, 485, 490, 495, 499)]


FAULTS_AFTER_REUSE = """
import os, resource, sys
sys.path.insert(0, {root!r})
from utils.memory import restart_without_tcache, retain_freed_memory
if {tcache_off}:
    restart_without_tcache()
import torch
if {retain} and not retain_freed_memory():
    print("unsupported"); sys.exit()
def step():  # tensors of 40, 64 and 48 MB (above glibc's largest mmap threshold), touched, then freed
    return [torch.ones(mb * 2 ** 18) for mb in (40, 64, 48)]
out = step(); del out
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
out = step(); del out  # the same step again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, os.environ.get("GLIBC_TUNABLES", ""))
"""


def test_retain_freed_memory_reuses_large_blocks_without_page_faults():
    """Without the setting, glibc maps every freed block of a repeated step anew and each of
    its 4-KiB pages (38,912 in 152 MB) faults in again; with it the step's blocks come back
    from the heap, already resident, but one of them (16,384 pages) only once the tcache is
    off too: restart_without_tcache re-runs the command once, with the tunable set."""
    faults = {}
    for retain, tcache_off in ((False, False), (True, False), (True, True)):
        code = FAULTS_AFTER_REUSE.format(root=ROOT, retain=retain, tcache_off=tcache_off)
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=env).stdout.split()
        if out[0] == "unsupported" or (tcache_off and platform.libc_ver()[0] != "glibc"):
            pytest.skip("no glibc here")
        assert out[1:] == (["glibc.malloc.tcache_count=0"] if tcache_off else []), out
        faults[retain, tcache_off] = int(out[0])
    assert faults[False, False] > 30000, faults
    assert faults[True, False] < faults[False, False] / 2, faults
    assert faults[True, True] < 1000, faults  # measured 0
