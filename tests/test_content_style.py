"""Robust-MSeg and SFusion (competitors/robustseg.py, sfusion.py on competitors/content_style.py)
against their fact sheets: sizes, the original's forward pass and checkpoint keys, the
masking, the losses by their formulas, the recipes, and the scripts end to end."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import competitors  # noqa: F401  (registers the competitors)
import reference_content_style as R
from competitors.content_style import kl_term
from competitors.sfusion import depth_to_space, positional_encoding
from engine.inference import window_starts
from helpers import ROOT, assert_shared_encoding_matches_forward, script
from models import ReferenceCheckpointError, build_model, from_reference, to_reference
from utils.brats import SUBSET_NAMES, SUBSETS
from utils.schedule import LRSchedule, make_optimizer

TINY = {"robustseg": dict(patch_size=16, width=4, style_width=4),
        "sfusion": dict(patch_size=16, width=4, style_width=4, token_grid=2, heads=2, depth=2)}
NAMES = tuple(TINY)
# parts the segmentation depends on (the style encoders and image decoders serve the losses)
INFERENCE = {"robustseg": ("content_encoders.", "gates.", "merges.", "decoder."),
             "sfusion": ("content_encoders.", "fusions.", "decoder.")}
MIXED = torch.tensor([[True, False, True, True], [False, True, False, False], [True, True, True, True]])


def make(name, seed=0, **extra):
    torch.manual_seed(seed)
    return build_model(name, **{**TINY[name], **extra})


def image(batch=3, side=16, seed=1):
    return torch.randn(batch, 4, side, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,total,inference,tensors", [("robustseg", 42_136_376, 6_643_348, 332),
                                                          ("sfusion", 41_353_400, 10_532_372, 680)])
def test_parameter_counts_at_the_original_configuration(name, total, inference, tensors):
    model = build_model(name)  # no forward pass: every parameter exists at construction
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for k, p in model.named_parameters() if k.startswith(INFERENCE[name])) == inference
    assert len(to_reference(model)["state_dict"]) == tensors


@pytest.mark.parametrize("name", NAMES)
def test_the_segmentation_uses_the_inference_parts_and_training_every_parameter(name):
    model = make(name).eval()
    model(image(1), torch.ones(1, 4, dtype=torch.bool)).sum().backward()
    used = {k for k, p in model.named_parameters() if p.grad is not None}
    assert used == {k for k, _ in model.named_parameters() if k.startswith(INFERENCE[name])}
    # training with T1c alone: Robust-MSeg zeroes the other content maps (zero gradients), SFusion
    # leaves them out (no gradient: Adam skips them, as in the original); the fusion blocks run
    model = make(name).train()
    x = image(2)
    mask = torch.tensor([[False, True, False, False], [False, True, False, False]])
    batch = {"image": x, "label": torch.randint(0, 4, (2, 16, 16, 16)), "mask": mask}
    model.loss(model(x, mask), batch)[0].backward()
    without = {k for k, p in model.named_parameters() if p.grad is None}
    if name == "robustseg":
        assert not without and not getattr(model, "unused_parameters", False)
    else:
        assert without == {k for k, _ in model.named_parameters()
                           if k.startswith(("content_encoders.0.", "content_encoders.2.", "content_encoders.3."))}
        assert model.unused_parameters and all(p.grad is not None for p in model.fusions.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_in_train_and_eval_mode(name):
    model = make(name)
    x = image(2)
    mask = MIXED[:2]
    out = model.train()(x, mask)
    assert set(out) == {"seg", "recon", "mu", "sigma"}
    assert out["seg"].shape == (2, 4, 16, 16, 16) and out["recon"].shape == (2, 4, 16, 16, 16)
    assert out["mu"].shape == out["sigma"].shape == (2, 4, 32)  # per modality, 8 x width channels
    with torch.no_grad():
        probs = model.eval()(x, mask)
    assert probs.shape == (2, 4, 16, 16, 16)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 16, 16, 16))
    assert model.window == (16, 16, 16) and model.output_kind == "classes"
    with pytest.raises(ValueError, match="input must be"):
        model(image(1, 32), mask[:1])


@pytest.mark.parametrize("name", NAMES)
def test_absent_modalities_have_no_influence_and_each_sample_keeps_its_mask(name):
    model = make(name).eval()
    x = image()
    changed = torch.where(MIXED[:, :, None, None, None], x, 100 * torch.randn_like(x))
    with torch.no_grad():
        a, b = model(x, MIXED), model(changed, MIXED)
        alone = torch.cat([model(x[i:i + 1], MIXED[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, alone, rtol=1e-4, atol=1e-5)  # mixed masks in one batch


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_encodes_each_window_once_and_gives_the_forward_passes_probabilities(name):
    assert_shared_encoding_matches_forward(make(name).eval(), image(1, 24)[0], SUBSETS)


def reference_state(model):
    state = to_reference(model)["state_dict"]
    assert all(k.startswith("module.") for k in state)
    return {k[len("module."):]: v for k, v in state.items()}


def original(name, state, x, mask, training=False):
    """The original's outputs; SFusion's takes one mask for the batch, in its own column order."""
    if name == "robustseg":
        return R.robustseg(state, x, mask, training)
    row = [bool(mask[0, m]) for m in R.SFUSION_ORDER]
    return R.sfusion(state, x, row, grid=2, heads=2, training=training)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("subset", [SUBSETS[1], SUBSETS[5], SUBSETS[11], SUBSETS[14]],
                         ids=[SUBSET_NAMES[i] for i in (1, 5, 11, 14)])
def test_eval_probabilities_match_the_original_forward(name, subset):
    model = make(name).eval()
    mask = torch.tensor([subset, subset])
    x = image(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), original(name, reference_state(model), x, mask)["seg"],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_training_outputs_match_the_original_forward(name):
    model = make(name, dropout=0.0, **({"attn_dropout": 0.0} if name == "sfusion" else {})).train()
    mask = torch.tensor([SUBSETS[12]] * 2)
    x = image(2)
    with torch.no_grad():
        ours, ref = model(x, mask), original(name, reference_state(model), x, mask, training=True)
    torch.testing.assert_close(ours["seg"], ref["seg"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["recon"], torch.cat(ref["recon"], 1), rtol=1e-4, atol=1e-4)
    for key in ("mu", "sigma"):
        torch.testing.assert_close(ours[key], torch.stack(ref[key], 1).flatten(2), rtol=1e-5, atol=1e-6)


def test_loss_against_its_formula_by_hand():
    g = torch.Generator().manual_seed(5)
    B, K, M, C, S = 2, 4, 4, 3, 3
    prob = torch.rand(B, K, S, S, S, generator=g).softmax(1)
    label = torch.randint(0, K, (B, S, S, S), generator=g)
    x, recon = torch.randn(B, M, S, S, S, generator=g), torch.randn(B, M, S, S, S, generator=g)
    mu, sigma = torch.randn(B, M, C, generator=g), torch.randn(B, M, C, generator=g)
    sigma[0, 1, 2] = 0.0  # log sigma^2 clamped at -50
    ce = 0.0
    for b in range(B):
        counts = [float((label[b] == k).sum()) for k in range(K)]
        for v in range(S ** 3):
            k = int(label[b].flatten()[v])
            ce -= (1 - counts[k] / sum(counts)) * math.log(max(float(prob[b, k].flatten()[v]), 0.005))
    ce /= B * S ** 3
    dice = 1 - sum(2 * float((prob[:, k] * (label == k)).sum())
                   / (float(prob[:, k].sum()) + float((label == k).sum()) + 1e-7) for k in range(K)) / K
    rec = sum(float((x[:, m] - recon[:, m]).abs().mean()) for m in range(M))
    kl = 0.0
    for m in range(M):
        terms = []
        for b in range(B):
            for c in range(C):
                s2 = float(sigma[b, m, c]) ** 2
                log_var = -50.0 if s2 == 0 else min(max(math.log(s2), -50.0), 50.0)
                terms.append(0.5 * (float(mu[b, m, c]) ** 2 + math.exp(log_var) - 1 - log_var))
        kl += sum(terms) / len(terms)
    outputs = {"seg": prob, "recon": recon, "mu": mu, "sigma": sigma}
    for name in NAMES:
        total, parts = make(name).loss(outputs, {"image": x, "label": label, "mask": MIXED[:B]})
        assert float(parts["seg"]) == pytest.approx(ce + dice, rel=1e-5)
        assert float(parts["rec"]) == pytest.approx(rec, rel=1e-5)
        assert float(parts["kl"]) == pytest.approx(kl, rel=1e-5)
        assert float(total) == pytest.approx(ce + dice + 0.1 * rec + 0.1 * kl, rel=1e-5)
    assert float(kl_term(torch.zeros(2, 3), torch.ones(2, 3))) == 0.0  # the standard normal's parameters


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_through_the_original_key_format(name, tmp_path):
    model = make(name).eval()
    path = tmp_path / "original.pth"
    to_reference(model, str(path))
    loaded = from_reference(str(path), name, **TINY[name]).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    x = image(1)
    with torch.no_grad():
        assert torch.equal(loaded(x, MIXED[:1]), model(x, MIXED[:1]))


def test_a_checkpoint_of_the_other_model_or_another_patch_size_is_refused_in_one_line():
    robust, fusion = to_reference(make("robustseg")), to_reference(make("sfusion"))
    with pytest.raises(ReferenceCheckpointError, match="looks like SFusion, patch_size / token_grid = 8") as err:
        from_reference(fusion, "robustseg", **TINY["robustseg"])
    assert "\n" not in str(err.value)
    with pytest.raises(ReferenceCheckpointError, match="looks like Robust-MSeg, patch_size=16"):
        from_reference(robust, "sfusion", **TINY["sfusion"])
    with pytest.raises(ReferenceCheckpointError, match=r"robustseg\(patch_size=32\).*patch_size=16"):
        from_reference(robust, "robustseg", **{**TINY["robustseg"], "patch_size": 32})
    with pytest.raises(ReferenceCheckpointError, match=r"sfusion\(patch_size=32\).*of another shape"):
        from_reference(fusion, "sfusion", **{**TINY["sfusion"], "patch_size": 32})


def test_depth_to_space_places_each_channel_by_the_sheets_index_formula():
    s, C, g = 2, 3, 2
    x = torch.arange(s ** 3 * C * g ** 3, dtype=torch.float32).view(1, s ** 3 * C, g, g, g)
    out = depth_to_space(x, s)
    assert out.shape == (1, C, g * s, g * s, g * s)
    for a in range(s):
        for b in range(s):
            for c in range(s):
                for ch in range(C):
                    k = ((a * s + b) * s + c) * C + ch
                    for i in range(g):
                        for j in range(g):
                            for l in range(g):
                                assert out[0, ch, i * s + a, j * s + b, l * s + c] == x[0, k, i, j, l]


def test_positional_table_values():
    table = positional_encoding(6, 4)
    want = [math.sin(5 / (1 + 1e-8)), math.cos(5 / (1 + 1e-8)), math.sin(5 / (100 + 1e-8)), math.cos(5 / (100 + 1e-8))]
    assert table[5].tolist() == pytest.approx(want, abs=1e-7)
    long = positional_encoding(2048, 16)  # four modalities of 8^3 tokens: angles up to 2047 rad
    for j in range(16):
        angle = 2047 / (10000 ** (2 * (j // 2) / 16) + 1e-8)
        assert float(long[2047, j]) == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle), abs=1e-7)


def test_sfusion_fusion_is_the_identity_for_one_modality():
    model = make("sfusion").eval()
    x = image(1)
    one, two = torch.tensor([[False, False, True, False]]), torch.tensor([[False, True, True, False]])
    with torch.no_grad():
        before = model(x, one), model(x, two)
        for p in model.fusions.parameters():
            p.add_(torch.randn_like(p))
        after = model(x, one), model(x, two)
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_sfusion_style_encoder_sizes():
    model = make("sfusion", patch_size=32)
    sizes = []
    for unit in model.style_encoders[0].convs:
        unit.register_forward_hook(lambda module, args, out: sizes.append(out.shape[2]))
    code = model.style_encoders[0](torch.randn(1, 1, 32, 32, 32))
    assert sizes == [32, 17, 9, 5, 3] and code.shape == (1, 8, 1, 1, 1)  # 128 -> 65 -> 33 -> 17 -> 9 at 128


def test_recipes_and_the_test_window():
    robust, fusion = build_model("robustseg").recipe, build_model("sfusion").recipe
    for recipe, epochs in ((robust, 300), (fusion, 200)):
        assert (recipe.optimizer, recipe.optimizer_args, recipe.lr, recipe.weight_decay, recipe.schedule,
                recipe.num_epochs, recipe.batch_size, recipe.subset_weights) == \
            ("adam", {"amsgrad": True}, 1e-4, 1e-4, "poly_epoch", epochs, 1, None)
    assert robust.augmentations == ("rotation", "intensity", "flip") and fusion.augmentations == ("rotation", "flip")
    optimizer = make_optimizer(fusion, [torch.zeros(1, requires_grad=True)])
    schedule = LRSchedule(optimizer, fusion, 875)
    lrs = [schedule.start_epoch(e) for e in (0, 100, 199)]
    assert lrs == pytest.approx([1e-4, 1e-4 * 0.5 ** 0.9, 1e-4 * 0.005 ** 0.9], rel=1e-6)
    assert build_model("robustseg").window == (80, 80, 80) and build_model("sfusion").window == (128, 128, 128)
    assert window_starts(128, 80, 40) == [0, 40, 48]


MODEL_FLAGS = {"robustseg": ["--patch_size", "32", "--width", "2"],
               "sfusion": ["--patch_size", "32", "--width", "2", "--heads", "1", "--depth", "1", "--token_grid", "2"]}


@pytest.mark.parametrize("name", NAMES)
def test_train_poly_and_test_py_on_a_tiny_cohort(name, tiny_cohort, tmp_path, capsys):
    npy = tiny_cohort[1]
    argv = ["--datapath", npy, "--savepath", str(tmp_path / "run"), "--num_workers", "0", "--no_progress",
            "--model", name, *MODEL_FLAGS[name], "--num_epochs", "1", "--iter_per_epoch", "1", "--val_file", ""]
    assert script("train_poly").main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("recipe (") and "optimizer=adam optimizer_args={'amsgrad': True} lr=0.0001" in out[0]
    assert "loss" in out[2] and "seg" in out[2] and "rec" in out[2] and "kl" in out[2]
    ckpt = torch.load(tmp_path / "run" / "model_last.pth", weights_only=True)
    assert ckpt["model"] == name and ckpt["config"]["patch_size"] == 32 and ckpt["step"] == 1
    assert script("test").main(["--datapath", npy, "--resume", str(tmp_path / "run" / "model_last.pth"),
                                "--savepath", str(tmp_path / "eval"), "--no_progress"]) == 0
    with open(tmp_path / "eval" / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [row["subset"] for row in summary] == list(SUBSET_NAMES) + ["mean"]
    assert all(0 <= float(row["WT"]) <= 1 for row in summary)
    assert os.path.isfile(tmp_path / "eval" / "summary.md")


def test_sfusion_trains_under_torchrun_when_absent_encoders_get_no_gradient(tiny_cohort, tmp_path):
    """Single-modality subsets only: three content encoders per step get no gradient, which
    DistributedDataParallel accepts because the model declares unused_parameters."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "train_poly.py"), "--datapath", tiny_cohort[1], "--savepath", str(tmp_path),
            "--device", "cpu", "--num_workers", "0", "--no_progress", "--num_epochs", "1", "--iter_per_epoch", "2",
            "--val_file", "", "--model", "sfusion", *MODEL_FLAGS["sfusion"],
            "--subset_weights", ",".join(["1"] * 4 + ["0"] * 11)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "model_last.pth", weights_only=True)
    assert ckpt["model"] == "sfusion" and ckpt["step"] == 2
