"""Missing as Masking (competitors/mam.py) against its fact sheet: the size at the original
configuration, the original's forward pass and nnU-Net checkpoint keys with axes, channels and
token order converted, the masking at the skips and the bottleneck, the loss by its formula,
the recipe (gradient clipping, tumour-centred crops, nnU-Net's augmentation) and the scripts."""
import csv
import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import competitors  # noqa: F401  (registers the competitors)
import reference_mam as R
from competitors.mam import ORIGINAL_ORDER, MaM
from data.augment import random_crop
from data.datasets import TrainDataset
from helpers import assert_shared_encoding_matches_forward, script
from models import ReferenceCheckpointError, build_model, from_reference, to_reference
from models.reference import reference_state
from utils.brats import SUBSET_NAMES, SUBSETS
from utils.pickled import load_weights

TINY = dict(patch_size=32, width=2, max_width=8, heads=2, head_dim=4, mlp_dim=16)  # bottleneck 1^3
SMALL = dict(TINY, patch_size=64)  # bottleneck 2^3: 32 tokens
MIXED = torch.tensor([[True, False, True, True], [False, True, False, False], [False, False, True, True]])


def make(seed=0, **config):
    torch.manual_seed(seed)
    return build_model("mam", **(config or TINY))


def image(batch, side, seed=1, dtype=torch.float32):
    return torch.randn(batch, 4, side, side, side, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def original_state(model):
    return {k[len("module."):]: v for k, v in to_reference(model)["state_dict"].items()}


def to_original(x):
    """(B, 4, X, Y, Z) in [FLAIR, T1c, T1, T2] -> (B, 4, Z, Y, X) in [FLAIR, T1, T1c, T2]."""
    return x[:, list(ORIGINAL_ORDER)].permute(0, 1, 4, 3, 2)


def test_size_at_the_original_configuration_and_the_original_keys():
    with torch.device("meta"):  # counted without a forward pass
        model = MaM()
    assert model.window == (128, 128, 128)
    assert sum(p.numel() for p in model.parameters()) == 39_062_383
    assert sum(p.numel() for p in model.encoders[0].parameters()) == 1_770_216
    assert sum(p.numel() for p in model.reconstruction.parameters()) == 165_120
    shapes = {k: tuple(v.shape) for k, v in reference_state(model).items()}
    assert shapes == R.expected_shapes() and len(shapes) == 691
    used = {k: s for k, s in shapes.items()
            if not k.startswith(("encoder.", "decoder.encoder.")) and "all_modules" not in k}
    assert sum(math.prod(s) for s in used.values()) == 39_062_383


def test_output_shapes_and_absent_modalities_have_no_influence():
    out = make()(image(3, 32), MIXED)
    assert [tuple(o.shape) for o in out["logits"]] == [(3, 3) + (32 // 2 ** i,) * 3 for i in range(5)]
    assert out["bottleneck"].shape == out["target"].shape == (3, 4, 8, 1, 1, 1) and not out["target"].requires_grad
    model = make(**SMALL).eval()  # a bottleneck of 2^3: its features depend on the images
    x = image(3, 64)
    with torch.no_grad():
        probs = model(x, MIXED)
        assert probs.shape == (3, 3, 64, 64, 64) and 0 <= probs.min() and probs.max() <= 1
        changed = x.clone()
        changed[~MIXED] = torch.randn_like(changed[~MIXED]) * 5
        assert torch.equal(model(changed, MIXED), probs)


def test_missing_skips_are_zero_and_present_modalities_keep_their_bottleneck_features():
    model = make(**SMALL).eval()
    with torch.no_grad():
        features = model.encode(image(3, 64))
        skips, bottom = model._fuse(features, MIXED)
    for level, skip in zip(features[:-1], skips[:-1]):
        per_modality = skip.view(3, 4, -1, *skip.shape[2:])  # modality-major, the original's order
        for j, m in enumerate(ORIGINAL_ORDER):
            expected = level[:, m] * MIXED[:, m, None, None, None, None]
            assert torch.equal(per_modality[:, j], expected)
    assert torch.equal(bottom[MIXED], features[-1][MIXED])  # present: their own maps
    assert not torch.allclose(bottom[~MIXED], features[-1][~MIXED])  # missing: reconstructed
    assert torch.equal(skips[-1].view(3, 4, *bottom.shape[2:]), bottom[:, list(ORIGINAL_ORDER)])


@pytest.mark.parametrize("subset", SUBSETS, ids=SUBSET_NAMES)
def test_eval_outputs_match_the_original_for_the_same_available_modalities(subset):
    model = make(**SMALL).double().eval()
    x = image(1, 64, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x, torch.tensor([subset]))
        logits, _, _ = R.mam(original_state(model), to_original(x), [subset[m] for m in ORIGINAL_ORDER],
                             heads=SMALL["heads"], dim_head=SMALL["head_dim"])
    torch.testing.assert_close(ours, torch.sigmoid(logits).permute(0, 1, 4, 3, 2), rtol=0, atol=1e-4)


def test_training_outputs_match_the_original():
    model = make(**SMALL).double()
    x = image(2, 64, dtype=torch.float64)
    subset = (True, False, False, True)  # the original takes one mask for the batch
    out = model(x, torch.tensor([subset] * 2))
    logits, bottleneck, target = R.mam(original_state(model), to_original(x), [subset[m] for m in ORIGINAL_ORDER],
                                       deep_supervision=True, heads=SMALL["heads"], dim_head=SMALL["head_dim"])
    for ours, theirs in zip(out["logits"], logits):
        torch.testing.assert_close(ours, theirs.permute(0, 1, 4, 3, 2))
    to_ours = lambda t: t.view(2, 4, -1, *t.shape[2:])[:, list(ORIGINAL_ORDER)].permute(0, 1, 2, 5, 4, 3)  # noqa: E731
    torch.testing.assert_close(out["bottleneck"], to_ours(bottleneck))
    torch.testing.assert_close(out["target"], to_ours(target.flatten(1, 2)))


def test_loss_against_its_formula_by_hand():
    model = make()
    g = torch.Generator().manual_seed(2)
    B = 2
    logits = [torch.randn(B, 3, *(32 // 2 ** i,) * 3, generator=g) for i in range(5)]
    bottleneck, target = torch.randn(B, 4, 8, 1, 1, 1, generator=g), torch.randn(B, 4, 8, 1, 1, 1, generator=g)
    label = torch.randint(0, 4, (B, 32, 32, 32), generator=g)
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    total, parts = model.loss({"logits": logits, "bottleneck": bottleneck, "target": target},
                              {"label": label, "mask": mask})
    weights = [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0]
    seg = 0
    for i, (w, z) in enumerate(zip(weights, logits)):
        step = 2 ** i  # the voxel nearest each coarse voxel's centre: offset step / 2
        small = label[:, step // 2::step, step // 2::step, step // 2::step]
        p = torch.sigmoid(z).double()
        bce = dice = 0
        for c, labels in enumerate([(1, 2, 3), (1, 3), (3,)]):  # WT, TC, ET
            t = torch.isin(small, torch.tensor(labels)).double()
            bce += -(t * p[:, c].log() + (1 - t) * (1 - p[:, c]).log()).mean() / 3
            dice += sum((2 * (p[b, c] * t[b]).sum() + 1e-5) / (p[b, c].sum() + t[b].sum() + 1e-5)
                        for b in range(B)) / (3 * B)
        seg += w * (bce - dice)
    mse = (((bottleneck[0, 1] - target[0, 1]) ** 2).mean() + ((bottleneck[0, 3] - target[0, 3]) ** 2).mean()) / 2
    assert parts["seg"].item() == pytest.approx(float(seg), rel=1e-5)
    assert parts["mse"].item() == pytest.approx(float(mse), rel=1e-5)
    assert total.item() == pytest.approx(parts["seg"].item() + parts["mse"].item(), rel=1e-6)
    full = model.loss({"logits": logits, "bottleneck": bottleneck, "target": target},
                      {"label": label, "mask": torch.ones(B, 4, dtype=torch.bool)})[1]
    assert full["mse"].item() == 0  # nothing missing, nothing to reconstruct


def test_every_crop_is_centred_on_tumour(tiny_cohort):
    npy = tiny_cohort[1]

    def tumour_in_crops(foreground):  # 8^3 crops of 40 x 36 x 32 cases
        data = TrainDataset(npy, f"{npy}/splits/train.txt", window=8, augmentations=(), seed=0, foreground=foreground)
        hits = []
        for epoch in range(5):
            data.set_epoch(epoch)
            hits += [bool(data[i]["label"].any()) for i in range(len(data))]
        return np.mean(hits)

    assert tumour_in_crops(MaM.recipe.foreground_oversampling) == 1 and tumour_in_crops(0) < 1
    label = np.zeros((40, 40, 40), np.uint8)
    label[5, 5, 5] = 3  # one ET voxel among many oedema voxels: a region is drawn first, then a voxel
    label[20:36, 20:36, 20:36] = 2
    image = np.zeros((40, 40, 40, 4), np.float32)
    hits = [random_crop(image, label, 8, np.random.default_rng(s), 1.0)[1].max() == 3 for s in range(300)]
    assert 0.55 < np.mean(hits) < 0.8  # ET and TC hold only the ET voxel: 2/3


def test_evaluation_encodes_each_window_once_and_gives_the_forward_passes_probabilities():
    subsets = [SUBSETS[i] for i in (0, 4, 10, 14)]
    volume = torch.randn(4, 64, 64, 72, generator=torch.Generator().manual_seed(3))
    assert_shared_encoding_matches_forward(make(**SMALL).eval(), volume, subsets)


def as_numpy1(path):
    """Rewrite a torch.save file as numpy 1.x writes it: numpy scalars' constructor under its
    numpy 1 name, numpy.core.multiarray.scalar (the pickle's GLOBAL lines hold module and name)."""
    with zipfile.ZipFile(path) as z:
        entries = {i: z.read(i.filename) for i in z.infolist()}
    with zipfile.ZipFile(path, "w") as z:
        for info, data in entries.items():
            if info.filename.endswith("data.pkl"):
                assert b"cnumpy._core.multiarray\nscalar\n" in data
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            z.writestr(info, data)


@pytest.mark.parametrize("numpy1", [False, True])
def test_round_trip_and_refusal(tmp_path, numpy1):
    model = make(**SMALL).eval()
    path = tmp_path / "checkpoint_best.pth"  # as nnU-Net writes it, numpy numbers in its log
    torch.save({"network_weights": original_state(model), "current_epoch": 499, "best_dice": np.float64(0.8),
                "init_args": {"configuration": "3d_fullres_multiencoder_recon", "device": torch.device("cpu")},
                "logging": {"ema_fg_dice": [np.float64(0.7), np.float32(0.8)]},
                "trainer_name": "nnUNetTrainerMissingReconBaseline"}, path)
    if numpy1:
        as_numpy1(path)
        assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        assert load_weights(str(path))["logging"]["ema_fg_dice"] == [0.7, np.float32(0.8)]
    loaded = from_reference(str(path), "mam", **SMALL).eval()
    x = image(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x, MIXED), model(x, MIXED))
    with pytest.raises(ReferenceCheckpointError, match="of another shape .*looks like MaM with patch_size=64, width=2"):
        from_reference(str(path), "mam", **{**SMALL, "width": 4})


def test_recipe():
    recipe = MaM.recipe
    assert (recipe.optimizer, recipe.optimizer_args, recipe.lr, recipe.weight_decay, recipe.schedule,
            recipe.num_epochs, recipe.iter_per_epoch, recipe.batch_size, recipe.grad_clip, recipe.subset_weights,
            recipe.foreground_oversampling, recipe.augmentations) == \
        ("sgd", {"momentum": 0.99, "nesterov": True}, 1e-2, 3e-5, "poly_epoch", 500, 150, 1, 12.0, None, 1.0,
         ("nnunet",))
    assert [round(w, 4) for w in make().ds_weights] == [0.5333, 0.2667, 0.1333, 0.0667, 0]
    with pytest.raises(ValueError, match="multiple of 32"):
        MaM(patch_size=48)


def test_train_poly_clips_the_gradient_and_test_py_runs(tiny_cohort, tmp_path, capsys, monkeypatch):
    norms = []
    clip = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda params, max_norm, total: norms.append(max_norm)
                        or clip(params, max_norm, total))
    npy = tiny_cohort[1]
    argv = ["--datapath", npy, "--savepath", str(tmp_path / "run"), "--num_workers", "0", "--no_progress",
            "--model", "mam", "--patch_size", "32", "--width", "2", "--model_args",
            '{"max_width": 8, "heads": 2, "head_dim": 4, "mlp_dim": 16}', "--num_epochs", "1",
            "--iter_per_epoch", "2"]
    assert script("train_poly").main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "optimizer=sgd optimizer_args={'momentum': 0.99, 'nesterov': True} lr=0.01 weight_decay=3e-05" in out[0]
    assert "augmentations=nnunet foreground_oversampling=1 warmup_epochs=0 grad_clip=12" in out[0]
    assert all(part in out[2] for part in ("seg", "mse", "validation Dice")) and norms == [12.0, 12.0]
    assert script("test").main(["--datapath", npy, "--resume", str(tmp_path / "run" / "model_last.pth"),
                                "--savepath", str(tmp_path / "eval"), "--no_progress",
                                "--subsets", "T2,FLAIR+T1c"]) == 0
    with open(tmp_path / "eval" / "summary.csv", newline="") as f:
        assert [row["subset"] for row in csv.DictReader(f)] == ["T2", "FLAIR+T1c", "mean"]
