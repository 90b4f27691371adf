"""U-HVED (competitors/uhved.py) against its fact sheet: sizes, the product of Gaussians, the
original's forward pass and checkpoint keys with its expert gating undone, the masking, the
KL and total loss by their formulas, the recipe, and the scripts end to end."""
import csv
import itertools
import json
import math

import pytest
import torch

import competitors  # noqa: F401  (registers the competitors)
import reference_uhved as R
from competitors.uhved import gaussian_kl, product_of_gaussians
from engine.inference import window_starts
from helpers import assert_shared_encoding_matches_forward, script
from models import ReferenceCheckpointError, build_model, from_reference, to_reference
from utils.brats import SUBSET_NAMES, SUBSETS

TINY = dict(patch_size=16, width=4)
MIXED = torch.tensor([[True, False, True, True], [False, True, False, False], [False, False, False, True]])


def make(seed=0, **extra):
    torch.manual_seed(seed)
    return build_model("uhved", **{**TINY, **extra})


def image(batch=3, side=16, seed=1):
    return torch.randn(batch, 4, side, side, side, generator=torch.Generator().manual_seed(seed))


def reference_state(model):
    state = to_reference(model)["state_dict"]
    assert all(k.startswith("module.") for k in state)
    return {k[len("module."):]: v for k, v in state.items()}


def original_mask(mask):
    """The mask that makes the original use the same modalities: its experts are [T1, T1c, T2,
    FLAIR], gated by columns 0-3."""
    return mask[:, [c for _, c in R.EXPERTS]]


def test_parameter_counts_and_initialisation():
    torch.manual_seed(0)
    model = build_model("uhved")
    assert sum(p.numel() for p in model.parameters()) == 1_250_552
    assert sum(p.numel() for k, p in model.named_parameters() if k.startswith(("encoders.", "seg_decoder."))) == 959_112
    assert [sum(p.numel() for p in part.parameters()) for part in (model.encoders[0], model.image_decoders[0],
                                                                   model.seg_decoder)] == [221_560, 72_860, 72_872]
    assert len(to_reference(model)["state_dict"]) == 195 and not list(model.buffers())
    scales = torch.cat([m.weight for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)])
    assert scales.abs().max() <= 2 and 0.95 < scales.std() < 1.07  # N(0, 2) truncated to [-2, 2]: std 1.007
    assert (scales < 0).any()
    conv = model.encoders[0].blocks[0][0].conv.weight  # (8, 8, 3, 3, 3): std sqrt(2 / (8 * 8 * 9)) = 0.0589
    assert conv.std().item() == pytest.approx(0.0589, rel=0.06)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv3d))


def test_product_of_gaussians():
    mean, logvar = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    m, lv = product_of_gaussians(mean, logvar, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(m, torch.zeros(2, 3)) and torch.allclose(lv.exp(), torch.ones(2, 3))  # the prior alone
    one = torch.tensor([[False, False, True, False]] * 2)
    m, lv = product_of_gaussians(mean, logvar, one)
    for b, c in itertools.product(range(2), range(3)):
        t = 1 / (math.exp(float(logvar[b, 2, c])) + 1e-7)
        assert float(m[b, c]) == pytest.approx(float(mean[b, 2, c]) * t / (1 + t), rel=1e-5)
        assert float(lv[b, c]) == pytest.approx(math.log(1 / (1 + t) + 1e-7), rel=1e-5, abs=1e-6)
    both = product_of_gaussians(mean, logvar, torch.tensor([True, False, True, False]))  # one mask for all
    t = 1 / (logvar[:, [0, 2]].exp() + 1e-7)
    torch.testing.assert_close(both[0], (t * mean[:, [0, 2]]).sum(1) / (1 + t.sum(1)))


def test_output_shapes_and_absent_modalities_have_no_influence():
    model = make()
    x = image()
    out = model.train()(x, MIXED)
    assert out["seg"].shape == (3, 4, 16, 16, 16) and out["recon"].shape == (3, 4, 16, 16, 16)
    assert [tuple(m.shape) for m, _ in out["gaussians"]] == [(3, 4, 2 * 2 ** l, 16 >> l, 16 >> l, 16 >> l)
                                                              for l in range(4)]
    model.eval()
    changed = torch.where(MIXED[:, :, None, None, None], x, 100 * torch.randn_like(x))
    with torch.no_grad():
        a, b = model(x, MIXED), model(changed, MIXED)
    assert a.shape == (3, 4, 16, 16, 16)
    torch.testing.assert_close(a.sum(1), torch.ones(3, 16, 16, 16))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert model.window == (16, 16, 16) and build_model("uhved").window == (112, 112, 112)
    with pytest.raises(ValueError, match="at least one modality"):
        model(x, torch.zeros(3, 4, dtype=torch.bool))


@pytest.mark.parametrize("index", range(15), ids=SUBSET_NAMES)
def test_eval_probabilities_match_the_original_for_the_same_available_modalities(index):
    model = make().eval()
    mask = torch.tensor([SUBSETS[index]] * 2)
    x = image(2)
    with torch.no_grad():
        ours = model(x, mask)
        theirs = R.uhved(reference_state(model), x, original_mask(mask)).softmax(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_the_original_gating_would_use_other_modalities():
    """The row the original labels T1 (mask column 2) uses T2 there; here T1."""
    model = make().eval()
    x, t1 = image(1), torch.tensor([SUBSETS[2]])
    with torch.no_grad():
        ours, quirk = model(x, t1), R.uhved(reference_state(model), x, t1).softmax(1)
        t2 = model(x, torch.tensor([SUBSETS[0]]))
    assert not torch.allclose(ours, quirk, atol=1e-3)
    torch.testing.assert_close(quirk, t2, rtol=1e-4, atol=1e-5)


def test_training_outputs_match_the_original_with_the_same_noise():
    model = make().train()
    x, mask = image(2), MIXED[:2]
    torch.manual_seed(7)
    ours = model(x, mask)
    torch.manual_seed(7)
    noise = [torch.randn(2, 2 * 2 ** l, 16 >> l, 16 >> l, 16 >> l) for l in range(4)]
    with torch.no_grad():
        theirs = R.uhved(reference_state(model), x, original_mask(mask), noise)
    torch.testing.assert_close(ours["seg"], theirs["seg"], rtol=1e-4, atol=1e-5)
    recon = torch.cat([theirs[k] for k in ("Flair", "T1c", "T1", "T2")], 1)
    torch.testing.assert_close(ours["recon"], recon, rtol=1e-4, atol=1e-5)


def test_kl_and_total_loss_against_their_formulas_by_hand():
    g = torch.Generator().manual_seed(3)
    model = make()
    B, M, S = 1, 4, 2
    gaussians = [(torch.randn(B, M, 1, S, S, S, generator=g), torch.randn(B, M, 1, S, S, S, generator=g))
                 for _ in range(4)]
    mask = torch.tensor([[True, False, False, True]])

    def product(mean, logvar, present, v):  # one element, eps 1e-5 as in the original's loss
        t = [1 / (math.exp(logvar[m][v]) + 1e-5) for m in present]
        total = 1 + sum(t)
        return sum(ti * mean[m][v] for ti, m in zip(t, present)) / total, math.log(1 / total + 1e-5)

    def divergence(a, b):
        return 0.5 * (-1 + b[1] - a[1] + (math.exp(a[1]) + (a[0] - b[0]) ** 2) / (math.exp(b[1]) + 0.01))

    kl = 0.0
    for mean_t, logvar_t in gaussians:
        mean, logvar = mean_t[0, :, 0].flatten(1).tolist(), logvar_t[0, :, 0].flatten(1).tolist()
        subsets = [s for k in range(1, 5) for s in itertools.combinations(range(4), k)]
        inter = prior = 0.0
        for s in subsets:
            for v in range(S ** 3):
                full, sub = product(mean, logvar, (0, 3), v), product(mean, logvar, s, v)
                inter += divergence(full, sub) / S ** 3
                prior += divergence(sub, (0.0, 0.0)) / S ** 3
        kl += (inter + prior) / 15 / 4
    assert float(model.kl(gaussians, mask)) == pytest.approx(kl, rel=1e-5)

    prob = torch.rand(B, 4, S, S, S, generator=g).softmax(1)
    label = torch.randint(0, 4, (B, S, S, S), generator=g)
    x, recon = torch.randn(B, 4, S, S, S, generator=g), torch.randn(B, 4, S, S, S, generator=g)
    voxels = [(b, i, j, k) for b in range(B) for i in range(S) for j in range(S) for k in range(S)]
    ce = sum(-math.log(max(float(prob[b, label[v]][i, j, k]), 0.005)) for v in voxels for b, i, j, k in [v]) / len(voxels)
    dice = 1 - sum(2 * float((prob[:, k] * (label == k)).sum())
                   / (float(prob[:, k].sum()) + float((label == k).sum()) + 1e-7) for k in range(4)) / 4
    mse = float(((recon - x) ** 2).sum()) / recon.numel()
    total, parts = model.loss({"seg": prob, "recon": recon, "gaussians": gaussians},
                              {"image": x, "label": label, "mask": mask})
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-5) and float(parts["dice"]) == pytest.approx(dice, rel=1e-5)
    assert float(parts["rec"]) == pytest.approx(mse, rel=1e-5)
    assert float(total) == pytest.approx(ce + dice + 0.1 * kl + 0.1 * mse, rel=1e-5)
    assert float(gaussian_kl(*(torch.zeros(3),) * 4)) == pytest.approx(0.5 * (-1 + 1 / 1.01))


def test_round_trip_and_refusal(tmp_path):
    model = make().eval()
    path = tmp_path / "original.pth"
    to_reference(model, str(path))
    loaded = from_reference(str(path), "uhved", **TINY).eval()
    x = image(1)
    with torch.no_grad():
        assert torch.equal(loaded(x, MIXED[:1]), model(x, MIXED[:1]))
    torch.manual_seed(0)
    robust = to_reference(build_model("robustseg", patch_size=16, width=4, style_width=4))
    with pytest.raises(ReferenceCheckpointError, match="looks like Robust-MSeg") as err:
        from_reference(robust, "uhved", **TINY)
    assert "\n" not in str(err.value)
    with pytest.raises(ReferenceCheckpointError, match=r"of another shape .*looks like U-HVED; check the model's sizes"):
        from_reference(to_reference(make(width=8)), "uhved", **TINY)


def test_evaluation_encodes_each_window_once_and_gives_the_forward_passes_probabilities():
    assert_shared_encoding_matches_forward(make().eval(), image(1, 24)[0], SUBSETS)


def test_recipe_and_window():
    recipe = build_model("uhved").recipe
    assert (recipe.optimizer, recipe.optimizer_args, recipe.lr, recipe.weight_decay, recipe.schedule,
            recipe.schedule_args, recipe.num_epochs, recipe.batch_size, recipe.subset_weights, recipe.augmentations) == \
        ("adam", {"amsgrad": True}, 1e-3, 1e-5, "plateau", {}, 400, 1, None, ("rotation", "intensity", "flip"))
    assert [window_starts(s, 112, 56) for s in (128, 168, 169)] == [[0, 16], [0, 56], [0, 56, 57]]


def test_train_poly_steps_the_plateau_schedule_on_the_validation_dice_and_test_py_runs(tiny_cohort, tmp_path, capsys):
    npy = tiny_cohort[1]
    argv = ["--datapath", npy, "--savepath", str(tmp_path / "run"), "--num_workers", "0", "--no_progress",
            "--model", "uhved", "--patch_size", "16", "--width", "2", "--num_epochs", "1", "--iter_per_epoch", "1"]
    assert script("train_poly").main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "optimizer=adam optimizer_args={'amsgrad': True} lr=0.001 weight_decay=1e-05 schedule=plateau" in out[0]
    assert all(part in out[2] for part in ("ce", "dice", "kl", "rec", "validation Dice"))
    ckpt = torch.load(tmp_path / "run" / "model_last.pth", weights_only=True)
    assert ckpt["model"] == "uhved" and ckpt["schedule"]["mode"] == "max"  # higher Dice is better
    assert ckpt["schedule"]["best"] == pytest.approx(ckpt["val_Dice_best"])
    assert script("test").main(["--datapath", npy, "--resume", str(tmp_path / "run" / "model_last.pth"),
                                "--savepath", str(tmp_path / "eval"), "--no_progress", "--subsets", "T1c,T1+T2"]) == 0
    with open(tmp_path / "eval" / "summary.csv", newline="") as f:
        assert [row["subset"] for row in csv.DictReader(f)] == ["T1c", "T1+T2", "mean"]
    run = json.loads((tmp_path / "eval" / "run.json").read_text())  # what compare.py reads
    model = build_model("uhved", patch_size=16, width=2)
    assert run["model"] == "uhved" and run["config"] == {**ckpt["config"]} and run["window"] == [16, 16, 16]
    assert run["parameters"] == sum(p.numel() for p in model.parameters())
    assert run["parameters_in_use"] == sum(p.numel() for k, p in model.named_parameters()
                                           if k.startswith(("encoders.", "seg_decoder.")))
    assert run["cases"] == 1 and run["subsets"] == ["T1c", "T1+T2"] and run["seconds_per_case"] > 0
