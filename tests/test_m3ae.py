"""M3AE (competitors/m3ae.py) against its fact sheet: the sizes of both stages at the original
configuration, the original's forward pass with its checkpoint keys, axes, channels and region
rows converted, the substitute image read at the native position, the pre-training masker, the
two-copy fine-tuning, both losses by their formulas, the recipes and the two stages through
the scripts."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import competitors  # noqa: F401  (registers the competitors)
import reference_m3ae as R
from competitors import m3ae
from competitors.m3ae import ORIGINAL_ORDER, M3AE, draw_present
from engine.evaluation import parameters_in_use
from helpers import script
from models import ReferenceCheckpointError, build_model, from_reference, to_reference
from models.reference import reference_state
from utils.brats import DROP_COUNT_WEIGHTS, SUBSETS

NATIVE = (40, 48, 36)  # (X, Y, Z)
TINY = dict(patch_size=32, width=8, native_shape=NATIVE)
MIXED = torch.tensor([[True, False, True, True], [False, True, False, False], [True, True, True, True]])


def make(seed=0, **config):
    torch.manual_seed(seed)
    return build_model("m3ae", **{**TINY, **config})


def image(batch, side=32, seed=1, dtype=torch.float32):
    return torch.randn(batch, 4, side, side, side, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grid(starts, steps=None):
    """(B, 3, 2) from per-sample (x0, y0, z0) and steps (default +1)."""
    starts = torch.tensor(starts)
    steps = torch.ones_like(starts) if steps is None else torch.tensor(steps)
    return torch.stack([starts, steps], -1)


def to_original(x):
    """(B, 4, X, Y, Z) in [FLAIR, T1c, T1, T2] -> (B, 4, Z, Y, X) in [T1, T1c, T2, FLAIR]."""
    return x[:, list(ORIGINAL_ORDER)].permute(0, 1, 4, 3, 2)


def regions_to_ours(logits):
    """Original [ET, TC, WT] rows in (Z, Y, X) -> [WT, TC, ET] in (X, Y, Z)."""
    return logits[:, [2, 1, 0]].permute(0, 1, 4, 3, 2)


def test_sizes_of_both_stages_at_the_original_configuration_and_the_original_keys():
    with torch.device("meta"):  # counted without a forward pass
        finetune, pretrain = M3AE(), M3AE(stage="pretrain")
    assert finetune.window == (128, 128, 128)
    assert sum(p.numel() for p in finetune.unet.parameters()) == 4_704_505
    assert sum(p.numel() for p in finetune.unet.ds_heads.parameters()) == 294  # inference: 4,704,211
    assert sum(p.numel() for p in pretrain.unet.parameters()) == 4_704_228
    assert finetune.limage.numel() == pretrain.limage.numel() == 35_712_000
    assert finetune.limage.shape == (1, 4, 240, 240, 155)
    for model, outputs, ds in ((finetune, 3, True), (pretrain, 4, False)):
        shapes = {k: tuple(v.shape) for k, v in reference_state(model).items()}
        assert shapes == R.reference_shapes(16, outputs, ds)  # (1, 4, 155, 240, 240) limage included
    assert len(finetune.state_dict()) == 117 and len(pretrain.state_dict()) == 113


def test_the_original_eval_and_training_outputs_with_the_substitute_image_at_the_native_position():
    state = R.random_reference_state(8, 3, True, NATIVE[::-1], torch.Generator().manual_seed(0), torch.float32)
    model = from_reference({"state_dict": {"module." + k: v for k, v in state.items()}}, "m3ae", **TINY).double()
    x = image(3, dtype=torch.float64)
    starts = [(0, 16, 4), (8, 3, 0), (5, 9, 2)]
    ref_state = {k: v.double() for k, v in state.items()}
    location = torch.tensor([s[::-1] for s in starts])
    ref = R.reference_logits(ref_state, to_original(x), MIXED[:, list(ORIGINAL_ORDER)], location)
    with torch.no_grad():
        ours = model.eval()(x, MIXED, grid(starts))
        torch.testing.assert_close(ours, torch.sigmoid(regions_to_ours(ref)), rtol=1e-6, atol=1e-8)
        train = model.train()(x, MIXED, grid(starts))["logits"]
    ref_train = R.reference_logits(ref_state, to_original(x), MIXED[:, list(ORIGINAL_ORDER)], location, training=True)
    assert len(train) == 3
    for o, r in zip(train, ref_train):  # the batch's own copy comes first
        torch.testing.assert_close(o[:3], regions_to_ours(r), rtol=1e-6, atol=1e-8)


def test_full_modality_output_does_not_depend_on_the_position_and_absent_images_have_no_influence():
    model = make().eval()
    x, full = image(2), torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        a = model(x, full, grid([(0, 0, 0), (8, 16, 4)]))
        b = model(x, full, grid([(8, 16, 4), (3, 1, 2)], [(1, -1, 1), (-1, 1, -1)]))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.shape == (2, 3, 32, 32, 32) and ((a > 0) & (a < 1)).all()
        mask = MIXED[:2]
        y = x.clone()
        y[~mask] = torch.randn_like(y[~mask])
        g = grid([(2, 5, 1), (7, 0, 3)])
        torch.testing.assert_close(model(x, mask, g), model(y, mask, g), rtol=0, atol=0)
        assert not torch.equal(model(x, mask, g), model(x, mask, grid([(2, 6, 1), (7, 0, 3)])))
    heads = sum(p.numel() for p in model.unet.ds_heads.parameters())  # training only
    assert parameters_in_use(model) == sum(p.numel() for p in model.parameters()) - heads


def test_a_missing_channel_is_the_substitute_image_at_the_native_position():
    model = make()
    S = model.limage.detach()[0].numpy()  # (M, X, Y, Z)
    x = image(3)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True], [True, True, True, False]])
    starts, steps = [(0, 16, 4), (39, 3, 0), (20, 30, 10)], [(1, 1, 1), (-1, 1, 1), (1, 1, -1)]
    filled = model.fill(x, mask, grid(starts, steps)).detach().numpy()
    for b, ((x0, y0, z0), (sx, sy, sz)) in enumerate(zip(starts, steps)):
        # by hand: voxel i at first + step * i, read at the border beyond the grid
        ix, iy, iz = (np.clip(f + s * np.arange(32), 0, n - 1) for f, s, n in zip((x0, y0, z0), (sx, sy, sz), NATIVE))
        for m in range(4):
            expected = x[b, m].numpy() if mask[b, m] else S[m][np.ix_(ix, iy, iz)]
            np.testing.assert_array_equal(filled[b, m], expected)
    np.testing.assert_array_equal(filled[0, 1], S[1, 0:32, 16:48, 4:36])


def test_the_drop_count_law():
    torch.manual_seed(0)
    n = 4000
    present = draw_present(n, 4, "cpu")
    index = {s: i for i, s in enumerate(SUBSETS)}
    counts = np.bincount([index[tuple(p)] for p in present.tolist()], minlength=15)
    assert stats.chisquare(counts, np.array(DROP_COUNT_WEIGHTS) * n).pvalue > 1e-3
    assert stats.chisquare(counts, np.full(15, n / 15)).pvalue < 1e-6  # not uniform over the subsets


def test_draws_keep_to_the_modalities_a_case_has_with_the_law_restricted_to_them():
    torch.manual_seed(0)
    n = 3000
    available = torch.tensor([[True, False, True, True]]).repeat(n, 1)  # T1c natively missing
    present = draw_present(n, 4, "cpu", available)
    allowed = [s for s in SUBSETS if not s[1]]
    index = {s: i for i, s in enumerate(allowed)}
    counts = np.bincount([index[tuple(p)] for p in present.tolist()], minlength=len(allowed))  # KeyError if T1c
    law = np.array([DROP_COUNT_WEIGHTS[SUBSETS.index(s)] for s in allowed])
    assert stats.chisquare(counts, law / law.sum() * n).pvalue > 1e-3
    torch.manual_seed(1)
    full = draw_present(50, 4, "cpu", torch.ones(50, 4, dtype=torch.bool))
    torch.manual_seed(1)
    assert torch.equal(full, draw_present(50, 4, "cpu"))  # complete cases: the law and draws unchanged


def test_the_second_copy_and_the_masker_never_use_a_natively_missing_modality():
    x, g = image(2), grid([(0, 0, 0), (4, 4, 4)])
    available = torch.tensor([[True, True, True, False], [True, True, True, True]])
    mask = torch.tensor([[True, False, True, False], [False, True, False, False]])
    model = make().train()
    seen = []
    model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    substitute = model.substitute(g).detach()
    for seed in range(8):
        torch.manual_seed(seed)
        model(x, mask, g, available=available)
        assert torch.equal(seen[-1][2, 3], substitute[0, 3])  # the second copy of case 0 never has T2
    pre = make(stage="pretrain").train()
    for seed in range(8):
        torch.manual_seed(seed)
        assert not pre.visible_patches(2, "cpu", available)[0, 3].any()


def test_the_masker_keeps_256_patches_visible_at_128_none_of_a_dropped_modality():
    with torch.device("meta"):
        model = M3AE(stage="pretrain")
    torch.manual_seed(1)
    dropped = set()
    for _ in range(6):
        visible = model.visible_patches(2, "cpu")  # (2, 4, 128, 128, 128)
        tokens = visible.view(2, 4, 8, 16, 8, 16, 8, 16).permute(0, 1, 2, 4, 6, 3, 5, 7).flatten(5)
        assert (tokens.all(-1) | ~tokens.any(-1)).all()  # whole 16^3 patches
        per_modality = tokens.any(-1).flatten(2).sum(2)  # (2, 4) visible patches
        assert (per_modality.sum(1) == 256).all()  # 12.5 % of 2048
        dropped |= {int((per_modality[b] == 0).sum()) for b in range(2)}
    assert dropped - {0} and dropped <= {0, 1, 2, 3}
    present = torch.tensor([[True, False, True, False]])
    torch.manual_seed(2)
    with pytest.MonkeyPatch.context() as mp:  # the masker's own modality draw replaced by a known one
        mp.setattr("competitors.m3ae.draw_present", lambda batch, M, device, available=None: present)
        visible = model.visible_patches(1, "cpu")
    assert not visible[0, 1].any() and not visible[0, 3].any() and visible.sum() == 256 * 16 ** 3


def test_pretraining_input_is_the_crop_where_visible_and_the_substitute_image_elsewhere():
    model = make(stage="pretrain").train()
    seen = []
    model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x, g = image(2), grid([(3, 7, 1), (8, 0, 4)], [(1, 1, 1), (1, -1, 1)])
    out = model(x, torch.ones(2, 4, dtype=torch.bool), g)
    assert out["reconstruction"].shape == (2, 4, 32, 32, 32)
    substitute = model.fill(torch.zeros_like(x), torch.zeros(2, 4, dtype=torch.bool), g).detach()
    kept = seen[0] == x
    assert (kept.flatten(1).sum(1) == 4 * 16 ** 3).all()  # 4 of the 32 16^3 patches (12.5 %)
    torch.testing.assert_close(seen[0][~kept], substitute[~kept], rtol=0, atol=0)


def test_finetuning_runs_two_copies_the_first_with_the_batch_mask():
    model = make().train()
    seen = []
    model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x, g = image(3), grid([(0, 0, 0), (1, 2, 3), (8, 16, 4)])
    torch.manual_seed(5)
    out = model(x, MIXED, g)
    assert [tuple(o.shape) for o in out["logits"]] == [(6, 3, 32, 32, 32)] * 3
    inputs, substitute = seen[0], model.substitute(g).detach()
    for copy in range(2):
        for b in range(3):
            for m in range(4):
                channel = inputs[copy * 3 + b, m]
                own = torch.equal(channel, x[b, m])
                assert own or torch.equal(channel, substitute[b, m])
                if copy == 0:
                    assert own == bool(MIXED[b, m])


def test_finetuning_loss_against_its_formula_by_hand():
    model = make()
    g = torch.Generator().manual_seed(3)
    B = 2
    logits = [torch.randn(2 * B, 3, 8, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    label = torch.randint(0, 4, (B, 8, 8, 8), generator=g)
    total, parts = model.loss({"logits": logits}, {"label": label})
    lab = np.concatenate([label.numpy()] * 2)  # both copies
    targets = [lab > 0, (lab == 1) | (lab == 3), lab == 3]  # WT, TC, ET
    seg = 0
    for z in logits:
        s = 1 / (1 + np.exp(-z.numpy()))
        terms = []
        for r, t in enumerate(targets):
            p = s[:, r]
            dice = (2 * (p * t).sum() + 1) / ((p ** 2).sum() + t.sum() + 1)
            bce = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
            terms.append(0.7 * (1 - dice) + 0.3 * bce)
        seg += np.mean(terms)
    distill = np.mean((logits[0][:B].numpy() - logits[0][B:].numpy()) ** 2)
    assert math.isclose(parts["seg"].item(), seg, rel_tol=1e-9)
    assert math.isclose(parts["distill"].item(), distill, rel_tol=1e-9)
    assert math.isclose(total.item(), seg + 0.1 * distill, rel_tol=1e-9)


def test_pretraining_loss_against_its_formula_by_hand():
    model = make(stage="pretrain").train()
    x = image(2)
    out = model(x, torch.ones(2, 4, dtype=torch.bool), grid([(0, 0, 0), (1, 1, 1)]))
    total, parts = model.loss(out, {"image": x})
    S = model.limage.detach().double().numpy()
    deviation = np.sqrt(((S - S.mean(axis=(2, 3, 4), keepdims=True)) ** 2).sum())
    mse = np.mean((out["reconstruction"].detach().double().numpy() - x.double().numpy()) ** 2)
    assert math.isclose(parts["deviation"].item(), deviation, rel_tol=1e-5)
    assert math.isclose(parts["mse"].item(), mse, rel_tol=1e-5)
    assert math.isclose(total.item(), mse + 0.005 * deviation, rel_tol=1e-5)
    total.backward()
    assert model.limage.grad is not None and model.limage.grad.abs().sum() > 0


def test_recipes_and_parameter_groups_of_the_two_stages():
    pre, fine = make(stage="pretrain"), make()
    assert pre.output_kind == "image" and fine.output_kind == "regions"
    r = pre.recipe
    assert (r.optimizer, r.lr, r.weight_decay, r.schedule, r.num_epochs, r.batch_size, r.augmentations) == \
        ("adam", 3e-4, 0.0, "cosine", 600, 2, ())
    r = fine.recipe
    assert (r.optimizer, r.lr, r.weight_decay, r.schedule, r.num_epochs, r.batch_size, r.augmentations) == \
        ("adam", 3e-4, 1e-4, "cosine", 300, 1, ("intensity", "flip"))
    assert r.subset_weights == DROP_COUNT_WEIGHTS
    groups = pre.optimizer_groups(pre.recipe)
    assert [g.get("lr") for g in groups] == [None, 5e-3] and groups[1]["params"] == [pre.limage]
    assert len(fine.optimizer_groups(fine.recipe)) == 1 and not fine.limage.requires_grad
    assert not any(p is fine.limage for p in fine.optimizer_groups(fine.recipe)[0]["params"])


def test_round_trip_through_the_original_format_and_refusals():
    model = make(seed=4)
    ckpt = to_reference(model)
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["module.limage"].shape == (1, 4) + NATIVE[::-1]
    back = from_reference(ckpt, "m3ae", **TINY)
    for (k, v), w in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(v, w), k
    pre = make(stage="pretrain")
    back = from_reference(to_reference(pre), "m3ae", stage="pretrain", **TINY)
    assert all(torch.equal(v, w) for v, w in zip(pre.state_dict().values(), back.state_dict().values()))
    with pytest.raises(ReferenceCheckpointError, match="stage='pretrain'"):
        from_reference(to_reference(pre), "m3ae", **TINY)


def test_both_stages_through_the_scripts(tiny_cohort, tmp_path, capsys, monkeypatch):
    npy = tiny_cohort[1]
    draws, draw = [], m3ae.draw_present
    monkeypatch.setattr(m3ae, "draw_present", lambda *args: draws.append(args[3]) or draw(*args))
    common = ["--datapath", npy, "--num_workers", "0", "--no_progress", "--model", "m3ae", "--patch_size", "32",
              "--width", "8", "--model_args", '{"native_shape": [40, 36, 32]}', "--num_epochs", "1",
              "--iter_per_epoch", "2"]
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    assert script("train_poly").main(common + ["--savepath", str(pre), "--stage", "pretrain"]) == 0
    out = capsys.readouterr().out
    assert "no validation" in out and "mse" in out and "deviation" in out and "validation Dice" not in out
    start = str(pre / "model_last.pth")
    ckpt = torch.load(start, weights_only=True)
    assert [g["initial_lr"] for g in ckpt["optim_dict"]["param_groups"]] == [3e-4, 5e-3]
    assert script("train_poly").main(common + ["--savepath", str(fine)]) == 1  # no substitute image
    assert "give --pretrained CKPT" in capsys.readouterr().err
    other = [a.replace("[40, 36, 32]", "[40, 36, 33]") for a in common]
    assert script("train_poly").main(other + ["--savepath", str(fine), "--pretrained", start]) == 1
    assert "has no limage of the model's shape" in capsys.readouterr().err
    assert not fine.exists()
    assert script("train_poly").main(common + ["--savepath", str(fine), "--pretrained", start]) == 0
    out = capsys.readouterr().out
    assert "111 of 117 tensors; initial: unet.head.weight, unet.head.bias, unet.ds_heads.0.weight" in out
    assert "distill" in out and "validation Dice" in out
    assert draws and all(a.dtype == torch.bool and a.shape[1] == 4 and a.all() for a in draws)  # what the cases have
    tuned = torch.load(fine / "model_last.pth", weights_only=True)
    assert torch.equal(tuned["state_dict"]["limage"], ckpt["state_dict"]["limage"])  # frozen
    assert tuned["pretrained"] == start
    assert script("train_poly").main(common + ["--savepath", str(fine), "--resume", str(fine / "model_last.pth"),
                                               "--pretrained", start]) == 1
    assert "give one of them" in capsys.readouterr().err
    assert script("test").main(["--datapath", npy, "--resume", str(fine / "model_last.pth"), "--savepath",
                                str(tmp_path / "eval"), "--no_progress", "--subsets", "T2,FLAIR+T1c"]) == 0
    capsys.readouterr()
    assert script("test").main(["--datapath", npy, "--resume", start, "--savepath", str(tmp_path / "eval2"),
                                "--no_progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a segmentation" in err[0] and "--pretrained" in err[0]
    assert not (tmp_path / "eval2").exists()
    # an original pre-training checkpoint (the original's layout and names) starts fine-tuning directly
    pre_model = build_model("m3ae", **ckpt["config"])
    pre_model.load_state_dict(ckpt["state_dict"])
    original = tmp_path / "model_1model_best_599.pth.tar"
    to_reference(pre_model, str(original))
    assert script("train_poly").main(common + ["--savepath", str(tmp_path / "fine2"), "--pretrained",
                                               str(original)]) == 0
    assert "111 of 117 tensors" in capsys.readouterr().out
    again = torch.load(tmp_path / "fine2" / "model_last.pth", weights_only=True)
    assert torch.equal(again["state_dict"]["limage"], ckpt["state_dict"]["limage"])
    finetuned = tmp_path / "finetuned.pth.tar"  # an original fine-tuning checkpoint is not the stage before
    to_reference(build_model("m3ae", **tuned["config"]), str(finetuned))
    assert script("train_poly").main(common + ["--savepath", str(tmp_path / "fine3"), "--pretrained",
                                               str(finetuned)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nor an original one of the stage before" in err[0]


def test_pretraining_resumes_as_the_uninterrupted_run(tiny_cohort, tmp_path):
    npy = tiny_cohort[1]
    common = ["--datapath", npy, "--num_workers", "0", "--no_progress", "--model", "m3ae", "--stage", "pretrain",
              "--patch_size", "32", "--width", "8", "--model_args", '{"native_shape": [40, 36, 32]}',
              "--iter_per_epoch", "1"]
    train = script("train_poly").main
    assert train(common + ["--savepath", str(tmp_path / "whole"), "--num_epochs", "2"]) == 0
    assert train(common + ["--savepath", str(tmp_path / "half"), "--num_epochs", "1"]) == 0
    assert train(["--datapath", npy, "--num_workers", "0", "--no_progress", "--savepath", str(tmp_path / "half"),
                  "--resume", str(tmp_path / "half" / "model_last.pth"), "--num_epochs", "2"]) == 0
    whole, resumed = (torch.load(tmp_path / run / "model_last.pth", weights_only=True)["state_dict"]
                      for run in ("whole", "half"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    initial = make(seed=999, stage="pretrain", native_shape=(40, 36, 32)).limage  # the runs' seed
    assert whole["limage"].shape == initial.shape and not torch.equal(whole["limage"], initial)  # trained
