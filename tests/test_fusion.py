import pytest
import torch
import torch.nn as nn

from models.fusion import MambaFusionBlock, MambaLayer

M = 4  # modalities


class PositionTagger(nn.Module):
    """Stands in for the Mamba layer: keeps its input and adds 1000 * position."""

    def forward(self, seq, keep=None):
        self.seq = seq
        out = seq + 1000.0 * torch.arange(seq.shape[1], dtype=seq.dtype)[None, :, None]
        return out if keep is None else out[:, keep]


def tagged_block(interleaved, dim=3, N=5):
    blk = MambaFusionBlock(dim, N, interleaved=interleaved)
    blk.mamba_layer = PositionTagger()
    return blk


def test_mamba_layer_computation():
    torch.manual_seed(0)
    layer = MambaLayer(16)
    x = torch.randn(2, 10, 16)
    h = x + layer.mamba(layer.norm1(x))
    torch.testing.assert_close(layer(x), h + layer.head(layer.norm2(h)))
    for keep in (slice(3, None, 4), slice(6, None)):  # only some positions computed: the same values
        torch.testing.assert_close(layer(x, keep), layer(x)[:, keep], rtol=0, atol=1e-6)
    assert layer.mamba.d_state == 16 and layer.mamba.dt_rank == 1
    big = MambaLayer(512)
    assert big.mamba.d_state == 256 and big.mamba.dt_rank == 32


def test_mamba_layer_float32_under_autocast():
    torch.manual_seed(0)
    layer = MambaLayer(16)
    x = torch.randn(1, 12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x.bfloat16().float()), rtol=0, atol=0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_token_layout(interleaved):
    N, d = 5, 3
    blk = tagged_block(interleaved, d, N)
    tokens = torch.randn(2, M, N, d)
    out = blk.fuse_tokens(tokens)
    seq = blk.mamba_layer.seq
    assert seq.shape == (2, (M + 1) * N, d)
    fusion = blk.fused_tokens.detach()[0]
    for i in range(N):
        for m in range(M):
            pos = i * (M + 1) + m if interleaved else m * N + i
            assert torch.equal(seq[:, pos], tokens[:, m, i])
        fpos = i * (M + 1) + M if interleaved else M * N + i
        assert torch.equal(seq[0, fpos], fusion[i]) and torch.equal(seq[1, fpos], fusion[i])
        # the output at position i is the layer's output at the fusion token's place
        torch.testing.assert_close(out[:, i], (fusion[i] + 1000.0 * fpos).expand(2, d))


@pytest.mark.parametrize("interleaved", [False, True])
def test_maps_flatten_in_c_order(interleaved):
    blk = tagged_block(interleaved, dim=2, N=2 * 3 * 4)
    maps = torch.randn(1, M, 2, 2, 3, 4)
    out = blk(maps)
    assert out.shape == (1, 2, 2, 3, 4)
    seq = blk.mamba_layer.seq
    for (x, y, z) in [(0, 0, 0), (1, 2, 3), (0, 1, 2), (1, 0, 1)]:
        i = (x * 3 + y) * 4 + z
        for m in range(M):
            pos = i * (M + 1) + m if interleaved else m * 24 + i
            assert torch.equal(seq[0, pos], maps[0, m, :, x, y, z])
        fpos = i * (M + 1) + M if interleaved else M * 24 + i
        expected = blk.fused_tokens.detach()[0, i] + 1000.0 * fpos
        torch.testing.assert_close(out[0, :, x, y, z], expected)
    assert torch.equal(blk(list(maps.unbind(1))), out)


def real_block(interleaved, N=6, d=8):
    torch.manual_seed(0)
    return MambaFusionBlock(d, N, interleaved=interleaved).double()


def test_interleaved_fusion_token_reads_only_earlier_positions():
    blk = real_block(True)
    tokens = torch.randn(1, M, 6, 8, dtype=torch.float64)
    base = blk.fuse_tokens(tokens)
    for m in range(M):
        for i in (0, 3, 5):
            t2 = tokens.clone()
            t2[0, m, i] += torch.randn(8, dtype=torch.float64)  # not constant: LayerNorm removes that
            out = blk.fuse_tokens(t2)
            torch.testing.assert_close(out[:, :i], base[:, :i], rtol=0, atol=0)
            assert (out[:, i] - base[:, i]).abs().max() > 0


def test_plain_fusion_token_reads_every_modality_token_and_no_later_fusion_token():
    blk = real_block(False)
    tokens = torch.randn(1, M, 6, 8, dtype=torch.float64, requires_grad=True)
    out = blk.fuse_tokens(tokens)
    for j in range(6):
        g_tokens, g_fusion = torch.autograd.grad(out[0, j].sum(), [tokens, blk.fused_tokens],
                                                 retain_graph=True)
        assert (g_tokens[0].abs().amax(-1) > 0).all()  # all 4N modality tokens
        assert (g_fusion[0, :j + 1].abs().amax(-1) > 0).all()
        assert torch.count_nonzero(g_fusion[0, j + 1:]) == 0


def test_wrong_number_of_positions_is_refused():
    blk = MambaFusionBlock(8, 6)
    with pytest.raises(ValueError, match="patch size must match"):
        blk(torch.randn(1, M, 8, 2, 2, 2))


@pytest.mark.parametrize("interleaved", [False, True])
def test_fusion_block_backward_reaches_all_parameters(interleaved):
    blk = MambaFusionBlock(8, 8, interleaved=interleaved)
    out = blk(torch.randn(2, M, 8, 2, 2, 2))
    out.square().mean().backward()
    missing = [n for n, p in blk.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
