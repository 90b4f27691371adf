"""Inference options of test.py and predict.py for every model: test-time mirroring (the
average of the flipped predictions, checked by hand), Gaussian window weights (against their
formula), ensembles (one checkpoint is itself; two are the mean of their outputs; different
model kinds refused), and their record in run.json."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointError, load_ensemble, save_checkpoint
from engine.evaluation import predict_ensemble, predict_subsets
from engine.inference import gaussian_weights, mirror_flips, sliding_window
from helpers import TINY_CONFIG, script
from models import build_model
from own_model import TinyPositionNet, TinyRegionNet
from utils.brats import SUBSETS

ALL_FLIPS = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def flipped(array, axes):
    """numpy flip of the last three axes along `axes` (0 x, 1 y, 2 z)."""
    return np.flip(array, [array.ndim - 3 + a for a in axes]) if axes else array


def test_mirror_flips_are_every_subset_of_the_axes():
    assert sorted(mirror_flips("xyz")) == sorted(ALL_FLIPS) and mirror_flips("xyz")[0] == ()
    assert sorted(mirror_flips("zx")) == [(), (0,), (0, 2), (2,)]
    assert mirror_flips("") == [()]
    for bad in ("xx", "xw"):
        with pytest.raises(ValueError, match="distinct letters"):
            mirror_flips(bad)


def test_gaussian_weights_follow_their_formula():
    window = (8, 5, 6)
    g = gaussian_weights(window).numpy()
    want = np.ones(window)
    for axis, w in enumerate(window):
        i = np.arange(w)
        values = np.exp(-((i - (w - 1) / 2) ** 2) / (2 * (w / 8) ** 2))
        shape = [1, 1, 1]
        shape[axis] = w
        want = want * values.reshape(shape)
    np.testing.assert_allclose(g, want / want.max(), rtol=1e-12)
    assert g.max() == 1 and np.allclose(g, g[::-1, ::-1, ::-1])  # symmetric: mirroring commutes with it


def test_gaussian_sliding_window_is_the_weighted_average_of_the_windows_by_hand():
    """Windows of 8 along x over a length of 12: starts 0 and 4; each window predicts its own
    start + 1 everywhere, so a voxel gets sum_k w_k(v) (s_k + 1) / sum_k w_k(v)."""
    volume = torch.zeros(1, 12, 3, 2)
    out = sliding_window(volume, (8, 3, 2), lambda w, s: (s[:, 0] + 1).double().view(-1, 1, 1, 1, 1, 1)
                         .expand(len(w), 1, 1, 8, 3, 2).clone(), with_starts=True, weight="gaussian")
    g = np.exp(-((np.arange(8) - 3.5) ** 2) / (2 * 1.0 ** 2))  # sigma 8/8 along x; y and z cancel
    numerator, denominator = np.zeros(12), np.zeros(12)
    for start in (0, 4):
        numerator[start:start + 8] += g * (start + 1)
        denominator[start:start + 8] += g
    np.testing.assert_allclose(out[0, 0, :, 1, 1].numpy(), numerator / denominator, rtol=1e-6)
    uniform = sliding_window(volume, (8, 3, 2), lambda w, s: (s[:, 0] + 1).double().view(-1, 1, 1, 1, 1, 1)
                             .expand(len(w), 1, 1, 8, 3, 2).clone(), with_starts=True)
    assert uniform[0, 0, 6, 0, 0] == 3  # (1 + 5) / 2: uniform stays the default
    ones = sliding_window(torch.ones(2, 19, 10, 7), (8, 6, 4), lambda w: w[:, None], weight="gaussian")
    torch.testing.assert_close(ones, torch.ones(1, 2, 19, 10, 7))


def test_mirroring_averages_the_flipped_predictions_of_a_model_that_is_not_flip_equivariant():
    torch.manual_seed(0)
    model = TinyRegionNet(window=(8, 6, 4)).eval()
    with torch.no_grad():
        model.conv.bias += torch.linspace(-1, 1, model.conv.bias.numel())
    volume = torch.randn(4, 8, 6, 4)  # one window: the sliding window adds nothing
    mask = SUBSETS[9]
    m = torch.tensor([mask])
    x = (volume * m[0, :, None, None, None])[None].numpy()
    by_hand = []
    with torch.no_grad():
        for axes in ALL_FLIPS:
            out = model(torch.from_numpy(flipped(x, axes).copy()), m).numpy()
            by_hand.append(flipped(out, axes))
    want = np.mean(by_hand, axis=0)[0]
    got = predict_subsets(model, volume, [mask], flips=mirror_flips("xyz"))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    plain = predict_subsets(model, volume, [mask])[0].numpy()
    assert np.abs(plain - want).max() > 1e-3  # the model is not flip-equivariant: mirroring changes it
    two = predict_subsets(model, volume, [mask], flips=mirror_flips("y"))[0].numpy()
    np.testing.assert_allclose(two, (by_hand[0][0] + by_hand[2][0]) / 2, rtol=1e-5, atol=1e-6)


def test_mirroring_keeps_the_shared_encoding_of_the_fifteen_subsets():
    """IM-Fuse (encode once per window and flip, decode per subset) mirrored equals the
    average of mirrored full forward passes with the absent images zeroed, subset by subset."""
    torch.manual_seed(1)
    model = build_model("imfuse", **TINY_CONFIG).eval()
    volume = torch.randn(4, 40, 32, 32)  # two windows along x
    subsets = [SUBSETS[0], SUBSETS[12], SUBSETS[14]]
    flips = mirror_flips("xz")
    shared = predict_subsets(model, volume, subsets, flips=flips, batch_size=2)
    with torch.no_grad():
        for s, mask in enumerate(subsets):
            m = torch.tensor([mask])

            def forward(w, m=m):
                outs = [model(w.flip([2 + a for a in f]), m.expand(len(w), -1)).flip([2 + a for a in f])
                        for f in flips]
                return (sum(outs) / len(outs))[:, None]

            want = sliding_window(volume * m[0, :, None, None, None], model.window, forward)[0]
            torch.testing.assert_close(shared[s], want, rtol=1e-4, atol=1e-5)


def test_mirrored_windows_of_a_position_model_keep_their_native_voxels():
    """A model that reads the native grid: a flipped window comes with step -1 and its first
    voxel at the far end, so the flipped-back output still lies on the right native voxels."""
    from test_positions import Where
    volume, origin = torch.zeros(4, 13, 9, 7), (5, 7, 3)
    out = predict_subsets(Where().eval(), volume, [(True,) * 4], origin=origin, flips=mirror_flips("xyz"))[0]
    expected = torch.stack(torch.meshgrid(*(torch.arange(o, o + n) for o, n in zip(origin, (13, 9, 7))),
                                          indexing="ij")).float() / 100
    torch.testing.assert_close(out, expected)
    torch.manual_seed(2)
    model = TinyPositionNet(window=(8, 6, 4)).eval()
    with torch.no_grad():
        model.bias.copy_(torch.randn(64))
    volume = torch.randn(4, 8, 6, 4)
    m = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        grid = torch.tensor([[[10 + 7, -1], [0, 1], [0, 1]]])  # x flipped: voxel 0 is native x 17
        by_hand = (model(volume[None], m, torch.tensor([[[10, 1], [0, 1], [0, 1]]]))
                   + model(volume[None].flip(2), m, grid).flip(2)) / 2
    got = predict_subsets(model, volume, [(True,) * 4], origin=(10, 0, 0), flips=mirror_flips("x"))[0]
    torch.testing.assert_close(got, by_hand[0])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny IM-Fuse checkpoints of different configurations and one tiny mmFormer."""
    base = tmp_path_factory.mktemp("ensemble")
    paths = []
    for seed, (name, config) in enumerate([("imfuse", TINY_CONFIG), ("imfuse", {**TINY_CONFIG, "dim": 16}),
                                           ("mmformer", {"patch_size": 32, "width": 2, "dim": 8, "heads": 1,
                                                         "mlp_dim": 16})]):
        torch.manual_seed(seed)
        model = build_model(name, **config)
        path = str(base / f"{name}{seed}.pth")
        save_checkpoint(path, {"model": name, "config": config, "state_dict": model.state_dict(), "epoch": seed})
        paths.append(path)
    return paths


def test_an_ensemble_of_one_is_its_checkpoint_and_of_two_the_mean_of_their_outputs(checkpoints):
    a, b, _ = checkpoints
    (one,), _ = load_ensemble([a])
    (first, second), _ = load_ensemble([a, b])
    assert first.dim != second.dim  # different configurations are allowed
    volume = torch.randn(4, 36, 32, 32)
    subsets = [SUBSETS[3], SUBSETS[14]]
    alone = predict_subsets(one, volume, subsets)
    torch.testing.assert_close(predict_ensemble([one], volume, subsets), alone, rtol=0, atol=0)
    torch.testing.assert_close(predict_ensemble([one, one], volume, subsets), alone, rtol=1e-6, atol=1e-7)
    mean = (predict_subsets(first, volume, subsets) + predict_subsets(second, volume, subsets)) / 2
    torch.testing.assert_close(predict_ensemble([first, second], volume, subsets), mean)


def test_an_ensemble_of_two_model_kinds_is_refused_in_one_line(checkpoints):
    a, _, mmformer = checkpoints
    with pytest.raises(CheckpointError) as err:
        load_ensemble([a, mmformer])
    message = str(err.value)
    assert "\n" not in message and message.startswith(mmformer) and "one model kind" in message


def test_test_py_records_the_inference_options_and_an_ensemble_of_one_checkpoint_twice_changes_nothing(
        tiny_cohort, checkpoints, tmp_path, capsys):
    npy = tiny_cohort[1]
    a, b, mmformer = checkpoints
    test = script("test").main
    common = ["--datapath", npy, "--subsets", "FLAIR,FLAIR+T1c+T1+T2", "--no_progress"]
    assert test(common + ["--resume", a, "--savepath", str(tmp_path / "one")]) == 0
    assert test(common + ["--resume", a, a, "--savepath", str(tmp_path / "twice")]) == 0
    assert test(common + ["--resume", a, b, "--tta", "xy", "--window_weight", "gaussian",
                          "--savepath", str(tmp_path / "options")]) == 0
    read = lambda name: open(tmp_path / name / "results.csv").read()  # noqa: E731
    assert read("one") == read("twice")
    run = json.load(open(tmp_path / "options" / "run.json"))
    assert run["checkpoints"] == [os.path.abspath(a), os.path.abspath(b)] and run["checkpoint"] == os.path.abspath(a)
    assert (run["tta"], run["flips"], run["window_weight"]) == ("xy", 4, "gaussian")
    assert [c["dim"] for c in run["configs"]] == [8, 16]
    base = json.load(open(tmp_path / "one" / "run.json"))
    assert (base["tta"], base["flips"], base["window_weight"]) == ("", 1, "uniform")
    assert "mirrored over xy, Gaussian windows" in open(tmp_path / "options" / "summary.md").readline()
    capsys.readouterr()
    assert test(common + ["--resume", a, mmformer, "--savepath", str(tmp_path / "mixed")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one model kind" in err[0]
    with pytest.raises(SystemExit) as code:
        test(common + ["--resume", a, "--tta", "xq", "--savepath", str(tmp_path / "bad")])
    assert code.value.code == 2 and "--tta" in capsys.readouterr().err
