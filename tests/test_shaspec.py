"""ShaSpec (competitors/shaspec.py) against its fact sheet: the size at the original
configuration, the original's forward pass and checkpoint keys with axes, channels and the
missing-slot rule converted, weight standardisation and the image-pool branch, each loss term
by its formula, the subset law and the warm-up, pickled checkpoints, and the scripts end to end."""
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import competitors  # noqa: F401  (registers the competitors)
import reference_shaspec as R
from competitors.shaspec import ORIGINAL_ORDER, ShaSpec, WSConv3d, standardize
from data.datasets import TrainDataset, draw_subset
from engine import convert
from engine.checkpoint import CheckpointError, load_model
from engine.evaluation import predict_subsets
from helpers import assert_shared_encoding_matches_forward, script
from models import ReferenceCheckpointError, build_model, from_reference, to_reference
from models.reference import reference_state
from utils.brats import SUBSET_NAMES, SUBSETS

TINY = dict(window=(32, 32, 16), width=4, blocks=(1, 1, 1, 1), features=8, decoder_width=4)
# the smallest window with a bottleneck of more than one voxel, with the original's block counts
PARITY = dict(window=(64, 64, 32), width=4, features=8, decoder_width=4)
MIXED = torch.tensor([[True, False, True, True], [False, True, False, False], [False, False, True, True]])


def make(seed=0, **config):
    torch.manual_seed(seed)
    return build_model("shaspec", **(config or TINY))


def image(batch, window, seed=1, dtype=torch.float32):
    return torch.randn(batch, 4, *window, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def original_mode(mask):
    """The original's `mode` (available channels in its order, ascending as in its eval.py)."""
    return [i for i, m in enumerate(ORIGINAL_ORDER) if mask[m]]


def to_original(x):
    """(B, 4, X, Y, Z) in [FLAIR, T1c, T1, T2] -> (B, 4, Z, X, Y) in [FLAIR, T1, T1c, T2]."""
    return x[:, list(ORIGINAL_ORDER)].permute(0, 1, 4, 2, 3)


def from_original_logits(logits):
    """(B, 3, Z, X, Y) [ET, WT, TC] -> (B, 3, X, Y, Z) [WT, TC, ET]."""
    return logits[:, [1, 2, 0]].permute(0, 1, 3, 4, 2)


def test_size_at_the_original_configuration_and_the_original_keys():
    with torch.device("meta"):  # counted without a forward pass (or any memory)
        model = ShaSpec()
    assert model.window == (160, 160, 80)
    assert sum(p.numel() for p in model.parameters()) == 187_708_132
    assert sum(p.numel() for p in model.shared.parameters()) == 35_127_872
    assert sum(p.numel() for p in model.decoder.parameters()) == 8_528_800
    shapes = {k: tuple(v.shape) for k, v in reference_state(model).items()}
    assert shapes == R.expected_shapes()
    assert len(shapes) == 944 and sum(math.prod(s) for s in shapes.values()) == 187_708_132


def test_output_shapes_and_absent_modalities_have_no_influence():
    out = make()(image(3, TINY["window"]), MIXED)
    assert out["logits"].shape == (3, 3, 32, 32, 16)
    assert out["shared"].shape == (3, 4, 8, 1, 1, 1) and out["domain"].shape == (3, 4, 4)
    model = make(**PARITY).eval()  # a bottleneck of 2 x 2 x 2: its features depend on the images
    x = image(3, PARITY["window"])
    with torch.no_grad():
        probs = model(x, MIXED)
        assert probs.shape == (3, 3, 64, 64, 32) and 0 <= probs.min() and probs.max() <= 1
        changed = x.clone()
        changed[~MIXED] = torch.randn_like(changed[~MIXED]) * 5
        assert torch.equal(model(changed, MIXED), probs)


@pytest.mark.parametrize("subset", SUBSETS, ids=SUBSET_NAMES)
def test_eval_outputs_match_the_original_for_the_same_available_modalities(subset):
    model = make(**PARITY).double().eval()
    state = {k[len("module."):]: v for k, v in to_reference(model)["state_dict"].items()}
    x = image(1, PARITY["window"], dtype=torch.float64)
    mask = torch.tensor([subset])
    with torch.no_grad():
        ours = model(x, mask)
        original = torch.sigmoid(R.shaspec(state, to_original(x), original_mode(subset)))
    torch.testing.assert_close(ours, from_original_logits(original), rtol=0, atol=1e-4)


def test_training_outputs_match_the_original():
    model = make(**PARITY).double()
    state = {k[len("module."):]: v for k, v in to_reference(model)["state_dict"].items()}
    x = image(1, PARITY["window"], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True]])
    out = model(x, mask)
    logits, shared, domain = R.shaspec(state, to_original(x), [0, 1, 2, 3], training=True)
    torch.testing.assert_close(out["logits"], from_original_logits(logits))
    torch.testing.assert_close(out["shared"][:, list(ORIGINAL_ORDER)].flatten(0, 1), shared.permute(0, 1, 3, 4, 2))
    torch.testing.assert_close(out["domain"][:, list(ORIGINAL_ORDER)].flatten(0, 1), domain)


def test_missing_slots_take_the_shared_feature_of_the_first_available_modality_in_the_original_order():
    model = make(**PARITY).eval()
    mask = torch.tensor([[False, False, True, True], [False, True, False, True], [True, True, True, False]])
    assert model._fill(mask).tolist() == [2, 1, 0]  # T1 before T2; T1c before T2; FLAIR first
    x = image(1, PARITY["window"])
    with torch.no_grad():  # {T1, T2}: the FLAIR and T1c slots are T1's shared feature, by hand
        skips, shared, specific, _ = model._encode(x * mask[:1, :, None, None, None])
        fused = shared + model.fusion(torch.cat([shared[0], specific[0]], 1))[None]
        slots = torch.stack([shared[0, 2], shared[0, 2], fused[0, 2], fused[0, 3]])[list(ORIGINAL_ORDER)]
        cat = lambda t: t[:, list(ORIGINAL_ORDER)].flatten(1, 2)  # noqa: E731
        logits = model.decoder(slots.flatten(0, 1)[None], [cat(s) for s in reversed(skips)])
        expected = torch.sigmoid(F.interpolate(logits, scale_factor=(2, 2, 1), mode="trilinear"))
        torch.testing.assert_close(model(x, mask[:1]), expected)
    model.train()  # training: a random available modality, as the original's shuffled list
    torch.manual_seed(0)
    draws = torch.stack([model._fill(mask) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {2, 3} and set(draws[:, 1].tolist()) == {1, 3}
    assert set(draws[:, 2].tolist()) == {0, 1, 2}


def test_weight_standardisation_against_its_formula():
    w = torch.randn(5, 3, 3, 3, 3, dtype=torch.float64)
    expected = torch.empty_like(w)
    for o in range(5):
        values = w[o].flatten().tolist()
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        expected[o] = (w[o] - mean) / math.sqrt(var + 1e-12)
    torch.testing.assert_close(standardize(w), expected)
    conv = WSConv3d(3, 5, 3, padding=1).double()
    x = torch.randn(1, 3, 6, 6, 6, dtype=torch.float64)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(5, 1, 1, 1, 1, dtype=torch.float64) * 10 + 0.1)  # per filter
    torch.testing.assert_close(conv(x), before)


def test_the_image_pool_branch_is_its_norm_bias_whatever_its_input_and_weights():
    aspp = make(**PARITY).shared.aspp
    with torch.no_grad():
        aspp.pool_norm.bias.copy_(torch.linspace(-1, 1, 8))
    pooled = lambda r: F.leaky_relu(aspp.pool_norm(aspp.pool_conv(r.mean((2, 3, 4), keepdim=True))), 0.01)  # noqa: E731
    a, b = pooled(torch.randn(1, 8, 2, 2, 2)), pooled(torch.randn(1, 8, 2, 2, 2) * 3 + 1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.flatten(), F.leaky_relu(torch.linspace(-1, 1, 8), 0.01))
    r = torch.randn(2, 8, 2, 2, 2)
    before = aspp(r)
    with torch.no_grad():
        aspp.pool_conv.weight.normal_()
        aspp.pool_norm.weight.mul_(3)
    torch.testing.assert_close(aspp(r), before)


def test_each_loss_term_against_its_formula_by_hand():
    model = make()
    g = torch.Generator().manual_seed(2)
    B, window = 2, TINY["window"]
    logits = torch.randn(B, 3, *window, generator=g)
    shared = torch.randn(B, 4, 8, 2, 2, 2, generator=g)
    domain = torch.randn(B, 4, 4, generator=g)
    label = torch.randint(0, 4, (B, *window), generator=g)
    total, parts = model.loss({"logits": logits, "shared": shared, "domain": domain}, {"label": label})
    p, regions = torch.sigmoid(logits).double(), [(1, 2, 3), (1, 3), (3,)]  # WT, TC, ET
    dice = bce = 0
    for c, labels in enumerate(regions):
        t = torch.isin(label, torch.tensor(labels)).double()
        d = [2 * (p[b, c] * t[b]).sum() / (p[b, c].sum() + t[b].sum() + 1) for b in range(B)]
        dice += (1 - sum(d) / B) / 3
        bce += -(t * p[:, c].log() + (1 - t) * (1 - p[:, c]).log()).mean()
    flair, t1c, t1, t2 = (shared[:, m] for m in range(4))
    l1 = sum((a - b).abs().mean() for a, b in ((flair, t1), (t1, t1c), (t1c, t2), (t2, flair)))
    domain_label = {0: 0, 1: 2, 2: 1, 3: 3}  # the original's classes FLAIR, T1, T1c, T2
    ce = -sum(domain[b, m].log_softmax(0)[domain_label[m]] for b in range(B) for m in range(4)) / (B * 4)
    for name, value in (("dice", dice), ("bce", bce), ("shared", l1), ("domain", ce)):
        assert parts[name].item() == pytest.approx(float(value), rel=1e-5), name
    assert total.item() == pytest.approx(float(dice + bce + 0.1 * l1 + 0.02 * ce), rel=1e-5)


def test_the_subset_law_and_the_uniform_option():
    weights = build_model("shaspec", **TINY).recipe.subset_weights
    law = {1: 1 / 16, 2: 1 / 24, 3: 1 / 16, 4: 1 / 4}  # k uniform in 1-4, then k modalities
    assert weights == tuple(law[sum(s)] for s in SUBSETS) and sum(weights) == pytest.approx(1)
    rng, n = np.random.default_rng(0), 12000
    counts = np.zeros(len(SUBSETS))
    for _ in range(n):
        counts[SUBSETS.index(draw_subset(rng, SUBSETS, weights))] += 1
    assert stats.chisquare(counts, np.array(weights) * n).pvalue > 1e-3
    assert stats.chisquare(counts, np.full(15, n / 15)).pvalue < 1e-6  # and not uniform
    args = script("train_poly").parser().parse_args(["--datapath", "d", "--savepath", "s", "--model", "shaspec",
                                                     "--subset_weights", "uniform"])
    assert args.subset_weights is None  # replaces the recipe's law by the uniform one


def test_warm_up_epochs_have_every_modality_then_the_law_applies(tiny_cohort):
    npy = tiny_cohort[1]
    data = TrainDataset(npy, f"{npy}/splits/train.txt", window=TINY["window"], augmentations=(), seed=0,
                        subset_weights=ShaSpec.recipe.subset_weights, warmup_epochs=2)
    masks = {}
    for epoch in range(4):
        data.set_epoch(epoch)
        masks[epoch] = [tuple(data[i]["mask"].tolist()) for i in range(len(data))]
    assert all(m == (True,) * 4 for e in (0, 1) for m in masks[e])
    assert any(m != (True,) * 4 for e in (2, 3) for m in masks[e])


def test_evaluation_encodes_each_window_once_and_gives_the_forward_passes_probabilities():
    model = make(**PARITY).eval()
    subsets = [SUBSETS[i] for i in (0, 4, 10, 14)]
    assert_shared_encoding_matches_forward(model, image(1, (64, 64, 40))[0], subsets)


def test_the_zero_image_encoding_is_computed_once_per_window_until_the_weights_change():
    model = make(**PARITY).eval()
    calls = []
    model.shared.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    volume = image(1, (64, 64, 40))[0]  # 1 x 1 x 2 windows of 64 x 64 x 32
    subsets = [SUBSETS[0], SUBSETS[14]]
    predict_subsets(model, volume, subsets)
    assert calls == [4, 1, 4]  # each window's four images, the zero image once
    calls.clear()
    predict_subsets(model, volume, subsets)
    assert calls == [4, 4]
    with torch.no_grad():
        next(model.shared.parameters()).mul_(0.5)  # a new version of one weight: computed again
    calls.clear()
    assert_shared_encoding_matches_forward(model, volume, subsets)
    assert calls[:3] == [4, 1, 4]


def test_round_trip_and_refusal(tmp_path):
    model = make(**PARITY).eval()
    path = tmp_path / "original.pth"
    to_reference(model, str(path))
    loaded = from_reference(str(path), "shaspec", **PARITY).eval()
    x = image(3, PARITY["window"])
    with torch.no_grad():
        assert torch.equal(loaded(x, MIXED), model(x, MIXED))
    with pytest.raises(ReferenceCheckpointError, match="of another shape .*looks like ShaSpec with width=4"):
        from_reference(str(path), "shaspec", **{**PARITY, "width": 8})


class Original(torch.nn.Module):
    """Stands in for the original's DualNet_SS object, which train_SS.py pickles whole."""

    def __init__(self, state):
        super().__init__()
        for key, value in state.items():
            self.register_parameter(key.replace(".", "__"), torch.nn.Parameter(value))

    def state_dict(self, *args, **kwargs):
        return {k.replace("__", "."): v for k, v in super().state_dict(*args, **kwargs).items()}


def test_pickled_original_checkpoints_are_refused_in_one_line_and_converted_on_request(tmp_path, capsys):
    model = make().eval()
    state = {k[len("module."):]: v for k, v in to_reference(model)["state_dict"].items()}
    original = Original(state)
    pickled = tmp_path / "best.pth"
    torch.save({"model": original, "optimizer": torch.optim.SGD(original.parameters(), lr=0.01),
                "iter": 245000, "val_Dice_best": np.float32(0.8)}, pickled)
    for load in (lambda: from_reference(str(pickled), "shaspec", **TINY),
                 lambda: load_model(str(pickled), "shaspec", TINY)):
        with pytest.raises((ReferenceCheckpointError, CheckpointError), match="holds pickled Python objects") as err:
            load()
        assert "\n" not in str(err.value) and "python -m engine.convert" in str(err.value)
    with pytest.raises(SystemExit):  # the risk must be named
        convert.main([str(pickled), str(tmp_path / "plain.pth")])
    assert "--trust_pickled_code" in capsys.readouterr().err
    convert.main([str(pickled), str(tmp_path / "plain.pth"), "--trust_pickled_code"])
    plain = torch.load(tmp_path / "plain.pth", weights_only=True)
    assert plain["iter"] == 245000 and plain["val_Dice_best"] == pytest.approx(0.8)
    assert len(plain["state_dict"]) == len(state)
    loaded = from_reference(str(tmp_path / "plain.pth"), "shaspec", **TINY).eval()
    x = image(3, TINY["window"])
    with torch.no_grad():
        assert torch.equal(loaded(x, MIXED), model(x, MIXED))
    torch.save(state, tmp_path / "state.pth")  # a plain state dict is accepted as it is
    assert torch.equal(from_reference(str(tmp_path / "state.pth"), "shaspec", **TINY).fusion.weight,
                       model.fusion.weight)


def test_recipe_and_window():
    recipe = ShaSpec.recipe
    assert (recipe.optimizer, recipe.optimizer_args, recipe.lr, recipe.weight_decay, recipe.schedule,
            recipe.num_epochs, recipe.warmup_epochs, recipe.batch_size, recipe.foreground_oversampling,
            recipe.augmentations) == ("sgd", {"momentum": 0.99, "nesterov": True}, 1e-2, 0.0, "poly_iteration",
                                      464, 280, 1, 0.5, ("nnunet_shaspec",))
    with pytest.raises(ValueError, match="multiples of 32"):
        ShaSpec(window=(48, 32, 16))
    with pytest.raises(ValueError, match=r"warmup_epochs \(280\) must be fewer than num_epochs \(200\)"):
        recipe.replace(num_epochs=200)


def test_train_poly_and_test_py_run_it(tiny_cohort, tmp_path, capsys):
    npy = tiny_cohort[1]
    argv = ["--datapath", npy, "--savepath", str(tmp_path / "run"), "--num_workers", "0", "--no_progress",
            "--model", "shaspec", "--window", "32", "32", "16", "--model_args",
            '{"width": 4, "blocks": [1, 1, 1, 1], "features": 8, "decoder_width": 4}',
            "--num_epochs", "2", "--iter_per_epoch", "1", "--warmup_epochs", "1"]
    assert script("train_poly").main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert "optimizer=sgd optimizer_args={'momentum': 0.99, 'nesterov': True} lr=0.01 weight_decay=0" in out[0]
    assert "augmentations=nnunet_shaspec foreground_oversampling=0.5 warmup_epochs=1" in out[0]
    assert all(part in out[2] for part in ("dice", "bce", "shared", "domain")) and "validation Dice" in out[3]
    ckpt = torch.load(tmp_path / "run" / "model_last.pth", weights_only=True)
    assert ckpt["model"] == "shaspec" and ckpt["recipe"]["warmup_epochs"] == 1
    assert script("test").main(["--datapath", npy, "--resume", str(tmp_path / "run" / "model_last.pth"),
                                "--savepath", str(tmp_path / "eval"), "--no_progress", "--subsets", "T1,T1c+T2"]) == 0
    with open(tmp_path / "eval" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["subset"] for row in rows] == ["T1", "T1c+T2", "mean"]
    assert all(0 <= float(row["WT"]) <= 1 for row in rows)
