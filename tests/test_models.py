"""IM-Fuse and mmFormer: shapes, parameter counts, masking, encode/decode, the original
checkpoint format, and agreement with an independent statement of the forward pass."""
import itertools

import pytest
import torch

import competitors  # noqa: F401  (registers mmformer)
import reference_forward
from models import ReferenceCheckpointError, build_model, cpu_kernels, from_reference, list_models, to_reference
from models.reference import reference_state
from utils.brats import SUBSETS

P = 32  # smallest patch size with a 2x2x2 bottleneck grid
IMFUSE_VARIANTS = [dict(interleaved=i, mamba_skip=s, first_skip=f)
                   for i, s, f in itertools.product((False, True), repeat=3)]
PAPER = dict(interleaved=True, mamba_skip=True, first_skip=False)


def variant_id(cfg):
    return ",".join(k for k, v in cfg.items() if v) or "plain"


def make(name, seed=0, **cfg):
    torch.manual_seed(seed)
    return build_model(name, patch_size=P, **cfg)


def perturb(model, seed=1, scale=0.05):
    """Move every parameter off its initial value (zero embeddings and biases included), so
    that a misplaced tensor changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def inputs(batch=2, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, P, P, P, generator=gen)
    mask = torch.tensor([SUBSETS[(7 * b + 10) % 15] for b in range(batch)])
    return x, mask


def test_registry():
    assert {"imfuse", "mmformer"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet3000")


@pytest.mark.parametrize("name,cfg", [("imfuse", c) for c in IMFUSE_VARIANTS] + [("mmformer", {})],
                         ids=[variant_id(c) for c in IMFUSE_VARIANTS] + ["mmformer"])
def test_output_shapes_train_and_eval(name, cfg):
    model = make(name, **cfg)
    x, mask = inputs(batch=1)
    model.eval()
    with torch.no_grad():
        pred = model(x, mask)
    assert pred.shape == (1, 4, P, P, P)
    torch.testing.assert_close(pred.sum(1), torch.ones(1, P, P, P))
    model.train()
    fused, aux, deep = model(x, mask)
    assert fused.shape == (1, 4, P, P, P)
    assert len(aux) == 4 and len(deep) == 4
    for out in aux + deep:
        assert out.shape == (1, 4, P, P, P)
        torch.testing.assert_close(out.sum(1), torch.ones(1, P, P, P))


def count(name, **cfg):
    with torch.device("meta"):  # builds the shapes only: no memory, no forward pass
        model = build_model(name, patch_size=128, **cfg)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_at_patch_128():
    assert count("imfuse", **PAPER) == 44_384_776
    assert count("imfuse", mamba_skip=True) == 44_384_776  # MFB and I-MFB have the same weights
    assert count("mmformer") == 36_391_760


def test_patch_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model("imfuse", patch_size=40)
    model = make("imfuse")
    with pytest.raises(ValueError, match="for the window 32x32x32"):
        model.eval()(torch.zeros(1, 4, 48, 48, 48), torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("name,cfg", [("imfuse", PAPER), ("imfuse", {}), ("mmformer", {})],
                         ids=["imfuse-paper", "imfuse-plain", "mmformer"])
def test_masked_modality_has_no_influence(name, cfg):
    model = perturb(make(name, **cfg)).eval()
    x, mask = inputs(batch=2)  # two samples with different subsets
    changed = torch.where(mask[:, :, None, None, None], x, 10 * torch.randn_like(x))
    with torch.no_grad():
        a, b = model(x, mask), model(changed, mask)
        c = model(x, ~mask)  # the other modalities: the prediction must change
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name,cfg", [("imfuse", PAPER), ("mmformer", {})], ids=["imfuse", "mmformer"])
def test_decode_of_encode_equals_forward(name, cfg):
    model = perturb(make(name, **cfg)).eval()
    x, mask = inputs(batch=2)
    with torch.no_grad():
        expected = model(x, mask)
        full = model.encode(x)  # every encoder runs
        assert len(full) == 5 and full[4].shape == (2, 4, 512, 2, 2, 2)
        assert full[1].shape == (2, 4, 16, P // 2, P // 2, P // 2)
        torch.testing.assert_close(model.decode(full, mask), expected, rtol=0, atol=1e-6)
        single = torch.tensor([[False, True, False, False]] * 2)
        skipped = model.encode(x, single)  # absent encoders are skipped: their features are zero
        # IM-Fuse's level 1 has no skip connection: its features are not kept
        assert (full[0] is None) == (skipped[0] is None) == (name == "imfuse")
        assert all(torch.count_nonzero(f[:, [0, 2, 3]]) == 0 for f in skipped if f is not None)
        torch.testing.assert_close(model.decode(skipped, single), model(x, single), rtol=0, atol=1e-6)


CASES = [("imfuse", PAPER), ("imfuse", dict(mamba_skip=True, first_skip=True)),
         ("imfuse", dict(first_skip=True)), ("imfuse", {}), ("mmformer", {})]
CASE_IDS = ["imfuse-paper", "imfuse-mfb-firstskip", "imfuse-concat-firstskip", "imfuse-plain",
            "mmformer"]


@pytest.mark.parametrize("name,cfg", CASES, ids=CASE_IDS)
def test_matches_the_independent_forward_from_original_weights(name, cfg):
    model = perturb(make(name, dropout=0.0, **cfg))
    state = reference_state(model, include_unused=False)
    x, mask = inputs(batch=2)
    with torch.no_grad():
        want_pred, want_aux, want_deep = reference_forward.forward(state, x, mask, name, **cfg)
        model.eval()
        with cpu_kernels.reference_path():
            torch.testing.assert_close(model(x, mask), want_pred, rtol=0, atol=2e-5)
        # the fused CPU kernels (tests/test_cpu_kernels.py) round differently over the network
        torch.testing.assert_close(model(x, mask), want_pred, rtol=0, atol=1e-4)
        model.train()  # dropout is 0: the training outputs are deterministic too
    with cpu_kernels.reference_path(), torch.no_grad():
        pred, aux, deep = model(x, mask)
    torch.testing.assert_close(pred, want_pred, rtol=0, atol=2e-5)
    for got, want in zip(aux + deep, want_aux + want_deep):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def reference_key_count(name, **cfg):
    with torch.device("meta"):
        return len(reference_state(build_model(name, patch_size=128, **cfg)))


def test_reference_key_format():
    # key counts of the original checkpoints at patch 128 (unused tensors included)
    assert reference_key_count("imfuse", **PAPER) == 354
    assert reference_key_count("imfuse", mamba_skip=True, first_skip=True) == 384
    assert reference_key_count("imfuse") == 370
    assert reference_key_count("mmformer") == 287
    state = to_reference(make("imfuse", **PAPER))["state_dict"]
    assert all(k.startswith("module.") for k in state)
    shapes = {k[len("module."):]: tuple(v.shape) for k, v in state.items()}
    assert shapes["flair_encoder.e1_c1.weight"] == (8, 1, 3, 3, 3)
    assert shapes["t1ce_encoder.e5_c3.conv.weight"] == (128, 128, 3, 3, 3)
    assert shapes["t2_transformer.cross_ffn_list.0.fn.fn.net.3.weight"] == (512, 4096)
    assert shapes["mamba_fusion_layers.0.fused_tokens"] == (1, 16 ** 3, 16)
    assert shapes["mamba_fusion_layers.3.mamba_layer.mamba.mamba.A_log"] == (1024, 256)
    assert shapes["mamba_fusion_layers.3.mamba_layer.mamba.head.weight"] == (512, 512)
    assert shapes["mamba_fusion_layer.fused_tokens"] == (1, 8, 512)  # built, never used
    assert shapes["decoder_fuse.RFM4.fusion_layer.0.conv.weight"] == (64, 64, 1, 1, 1)
    assert shapes["decoder_fuse.seg_d4.weight"] == (4, 128, 1, 1, 1)
    assert shapes["decoder_sep.d1_c2.conv.weight"] == (8, 16, 3, 3, 3)
    mm = {k[len("module."):]: tuple(v.shape) for k, v in to_reference(make("mmformer"))["state_dict"].items()}
    assert mm["multimodal_decode_conv.weight"] == (512, 2048, 1, 1, 1)
    assert mm["decoder_fuse.RFM1.fusion_layer.0.conv.weight"] == (8, 32, 1, 1, 1)
    assert mm["flair_decode_conv.weight"] == (128, 512, 1, 1, 1)  # built, never used


@pytest.mark.parametrize("name,cfg", CASES, ids=CASE_IDS)
def test_reference_round_trip(name, cfg, tmp_path):
    model = perturb(make(name, **cfg)).eval()
    path = tmp_path / "model_best.pth"
    to_reference(model, path)
    loaded = from_reference(str(path), name, patch_size=P, **cfg).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x, mask = inputs(batch=1)
    with torch.no_grad():
        assert torch.equal(model(x, mask), loaded(x, mask))


def test_unused_and_bare_checkpoints_load():
    model = make("imfuse", **PAPER)
    ckpt = to_reference(model)
    # decode convs that another version of the original code builds are dropped too
    ckpt["state_dict"]["module.flair_decode_conv.weight"] = torch.zeros(128, 512, 1, 1, 1)
    from_reference(ckpt, "imfuse", patch_size=P, **PAPER)
    bare = {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}  # no DataParallel prefix
    from_reference({"state_dict": bare}, "imfuse", patch_size=P, **PAPER)


@pytest.mark.parametrize("cfg,expect", [
    (dict(interleaved=True, mamba_skip=False), "looks like IM-Fuse, patch_size=32, mamba_skip=True, first_skip=False"),
    (dict(interleaved=True, mamba_skip=True, first_skip=True), "first_skip=False"),
    (dict(interleaved=True, mamba_skip=True, patch_size=64), "patch_size=32, mamba_skip=True"),
])
def test_from_reference_refuses_another_variant(cfg, expect):
    ckpt = to_reference(make("imfuse", **PAPER))
    cfg = dict(dict(patch_size=P), **cfg)
    with pytest.raises(ReferenceCheckpointError) as err:
        from_reference(ckpt, "imfuse", **cfg)
    message = str(err.value)
    assert "\n" not in message and expect in message and "check patch_size, mamba_skip" in message
    assert len(message) < 600


def test_from_reference_refuses_other_models_and_bad_files(tmp_path):
    mm = to_reference(make("mmformer"))
    with pytest.raises(ReferenceCheckpointError, match="looks like .*mmFormer"):
        from_reference(mm, "imfuse", patch_size=P)
    with pytest.raises(ReferenceCheckpointError, match="no such checkpoint"):
        from_reference(str(tmp_path / "missing.pth"), "imfuse", patch_size=P)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ReferenceCheckpointError, match="junk.pth: not a checkpoint this project can read safely"):
        from_reference(str(junk), "imfuse", patch_size=P)
    with pytest.raises(ReferenceCheckpointError, match="not a dict of tensors"):
        from_reference({"state_dict": {"a": 1}}, "imfuse", patch_size=P)


def test_training_step_reaches_every_parameter():
    model = make("imfuse", **PAPER).train()
    x, _ = inputs(batch=1)
    mask = torch.ones(1, 4, dtype=torch.bool)  # a missing modality's intra-modal block gets none
    fused, aux, deep = model(x, mask)
    (fused.square().sum() + sum(o.square().sum() for o in aux + deep)).backward()
    unreached = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unreached == []
