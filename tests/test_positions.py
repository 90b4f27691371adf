"""Native-grid positions for the models that use them (models/base.py, `uses_position`): the
place of every training crop (crop box + crop start, flips tracked) and of every evaluation
window (crop box + window start), checked against the native volumes; the refusals; and a
model of that kind trained and evaluated through the scripts."""
import json
import shutil

import numpy as np
import pytest
import torch

from data.datasets import EvalDataset, TrainDataset
from data.preprocessing import CaseError, load_case
from engine.evaluation import predict_subsets
from helpers import ROOT, script


class Where(torch.nn.Module):
    """Eval output: the native (X, Y, Z) index of every voxel, divided by 100."""
    output_kind, uses_position, window = "regions", True, (8, 6, 4)

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, mask, grid):
        B = x.shape[0]
        maps = []
        for axis, n in enumerate(self.window):
            index = grid[:, axis, :1] + grid[:, axis, 1:] * torch.arange(n)  # (B, n)
            shape = [B, 1, 1, 1]
            shape[axis + 1] = n
            maps.append(index.view(shape).expand(B, *self.window))
        return torch.stack(maps, 1).float() / 100


def test_evaluation_windows_are_placed_at_the_crop_box_plus_their_start():
    volume, origin = torch.zeros(4, 13, 9, 7), (5, 7, 3)  # windows overlap, the last ones flush with the end
    out = predict_subsets(Where().eval(), volume, [(True,) * 4], origin=origin)[0]
    expected = torch.stack(torch.meshgrid(*(torch.arange(o, o + n) for o, n in zip(origin, (13, 9, 7))),
                                          indexing="ij")).float() / 100
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="needs its crop box"):
        predict_subsets(Where().eval(), volume, [(True,) * 4])


def test_training_crops_know_their_native_voxels_flips_included(tiny_cohort):
    raw, npy = tiny_cohort
    data = TrainDataset(npy, f"{npy}/splits/train.txt", window=(16, 12, 8), augmentations=("intensity", "flip"),
                        seed=0, foreground=0.5, positions=True)
    native = {name: load_case(f"{raw}/{name}").label for name in data.cases}
    steps = set()
    for epoch in range(4):
        data.set_epoch(epoch)
        for i in range(len(data)):
            sample = data[i]
            grid = sample["grid"].numpy()
            index = [first + step * np.arange(n) for (first, step), n in zip(grid, (16, 12, 8))]
            np.testing.assert_array_equal(native[sample["name"]][np.ix_(*index)], sample["label"].numpy())
            steps.update(grid[:, 1].tolist())
    assert steps == {1, -1}  # flipped and unflipped axes both seen
    assert "origin" in EvalDataset(npy, data.cases[:1])[0]


def test_refusals(tiny_cohort, tmp_path):
    npy = tiny_cohort[1]
    with pytest.raises(ValueError, match="'rotation' moves voxels off the native grid"):
        TrainDataset(npy, f"{npy}/splits/train.txt", window=16, augmentations=("rotation", "flip"), positions=True)
    copy = tmp_path / "npy"
    shutil.copytree(npy, copy)
    case = open(copy / "splits" / "train.txt").read().split()[0]
    meta = json.loads((copy / "meta" / f"{case}.json").read_text())
    del meta["crop_box"]
    (copy / "meta" / f"{case}.json").write_text(json.dumps(meta))
    with pytest.raises(CaseError, match=f"{case}.*no crop box"):
        TrainDataset(str(copy), [case], window=16, augmentations=(), positions=True)


def test_a_model_that_uses_positions_trains_and_is_evaluated_through_the_scripts(tiny_cohort, tmp_path):
    npy, spec = tiny_cohort[1], f"{ROOT}/tests/own_model.py:TinyPositionNet"
    argv = ["--datapath", npy, "--savepath", str(tmp_path / "run"), "--num_workers", "0", "--no_progress",
            "--model", spec, "--num_epochs", "1"]
    assert script("train_poly").main(argv) == 0
    ckpt = torch.load(tmp_path / "run" / "model_last.pth", weights_only=True)
    assert ckpt["state_dict"]["bias"].abs().sum() > 0  # the positions reached the loss
    assert script("test").main(["--datapath", npy, "--resume", str(tmp_path / "run" / "model_last.pth"),
                                "--model", spec, "--savepath", str(tmp_path / "eval"), "--no_progress",
                                "--subsets", "T1c"]) == 0
