"""Tests specific to the transformer backbones (mmFormer, M2FTrans) at tiny sizes.

Generic contract tests over every registered backbone live in tests/test_models.py.
"""
from __future__ import annotations

import pytest
import torch

from passion.models import build_model
from passion.models.transformer import Attention, token_grid

NAMES = ("mmformer", "m2ftrans")
# small transformer widths so that the tests stay fast
SMALL = {"mmformer": {"transformer_dim": 16, "mlp_dim": 32, "num_heads": 2}, "m2ftrans": {"mlp_dim": 32}}
REFERENCE_PARAMS = {"mmformer": 35_599_184, "m2ftrans": 13_194_788}
MIXED = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, dims: int = 2, width: int = 2, **options):
    torch.manual_seed(0)
    patch = (32,) * dims
    model = build_model(name, num_modalities=4, num_classes=3, base_width=width, patch_size=patch,
                        spatial_dims=dims, **{**SMALL[name], **options})
    return model.eval().double(), patch


def images(batch: int, patch, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *patch, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_reference(name):
    model = build_model(name, num_modalities=4, num_classes=4, base_width=8, patch_size=(80, 80, 80),
                        spatial_dims=3)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]


def test_mmformer_token_layouts_share_parameters():
    a = build_model("mmformer", num_modalities=4, num_classes=4, base_width=4, patch_size=(32, 32, 32),
                    spatial_dims=3)
    b = build_model("mmformer", num_modalities=4, num_classes=4, base_width=4, patch_size=(32, 32, 32),
                    spatial_dims=3, token_layout="spatial")
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert a.transformer_dim == 256  # 64 * base_width, i.e. 512 at the paper's width 8


class _PassTokens(torch.nn.Module):
    def forward(self, tokens, pos):
        return tokens


@pytest.mark.parametrize("dims", (2, 3))
def test_mmformer_token_layouts_place_tokens_on_the_grid(dims):
    """With the transformer and the output conv made identities, "spatial" puts token (m, n) of the
    modality-major sequence at grid cell n, channels m*E..(m+1)*E; "reference" keeps the
    reference's plain view: cell n holds the M*E values that follow position n*M*E of the sequence."""
    intra = torch.randn(2, 4, 3, *(2,) * dims, dtype=torch.float64)  # [B, M, E, *grid]
    b, m, e = intra.shape[:3]
    grid = intra.shape[3:]
    tokens = intra.flatten(3).transpose(2, 3).reshape(b, -1, e)  # modality-major [B, M*N, E]
    expected = {"spatial": intra.reshape(b, m * e, *grid),
                "reference": tokens.reshape(b, -1, m * e).transpose(1, 2).reshape(b, m * e, *grid)}
    assert not torch.equal(expected["spatial"], expected["reference"])
    for layout, want in expected.items():
        model, _ = tiny("mmformer", dims, token_layout=layout)
        model.grid = tuple(grid)
        model.inter_transformer, model.inter_conv = _PassTokens(), torch.nn.Identity()
        torch.testing.assert_close(model._inter_modal(intra), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dims", (2, 3))
def test_shapes_and_scales(name, dims):
    model, patch = tiny(name, dims)
    x = images(2, patch)
    mask = MIXED[:2]
    with torch.no_grad():
        feats = model.encode(x, mask)
        out = model.fuse(feats, mask)
        sep = model.decode_single(feats, mask)
    assert len(feats.scales) == 5
    assert [tuple(s.shape[:3]) for s in feats.scales] == [(2, 4, 2 * 2 ** l) for l in range(5)]
    assert feats.scales[-1].shape[3:] == token_grid(patch)
    assert out.logits.shape == (2, 3, *patch)
    n_aux = 4 if name == "mmformer" else 5
    assert len(out.aux_logits) == n_aux
    first = 1 if name == "mmformer" else 0  # mmFormer supervises 1/2 .. 1/16, M2FTrans 1 .. 1/16
    for s, aux in enumerate(out.aux_logits):
        assert aux.shape == (2, 3, *(p // 2 ** (s + first) for p in patch))
    assert out.decoder_features[0].shape == (2, 2, *patch)
    assert sep.shape == (2, 4, 3, *patch)
    assert torch.isfinite(out.logits).all() and torch.isfinite(sep).all()


@pytest.mark.parametrize("name", NAMES)
def test_unavailable_modalities_are_zero_everywhere(name):
    model, patch = tiny(name)
    with torch.no_grad():
        feats = model.encode(images(3, patch), MIXED)
        sep = model.decode_single(feats, MIXED)
    for t in [*feats.scales, *feats.extra.values()]:
        assert (t[~MIXED] == 0).all()
        assert (t[MIXED].abs().sum(dim=tuple(range(1, t.dim() - 1))) > 0).all()
    assert (sep[~MIXED] == 0).all() and (sep[MIXED] != 0).any()
    if name == "mmformer":
        assert "intra" in feats.extra  # the intra-modal transformer output, zero where absent


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dims", (2, 3))
def test_mixed_mask_batch_equals_per_sample_runs(name, dims):
    model, patch = tiny(name, dims)
    x = images(3, patch)
    with torch.no_grad():
        batched = model.fuse(model.encode(x, MIXED), MIXED)
        for b in range(3):
            single = model.fuse(model.encode(x[b:b + 1], MIXED[b:b + 1]), MIXED[b:b + 1])
            torch.testing.assert_close(single.logits, batched.logits[b:b + 1])
            for s, t in zip(single.aux_logits, batched.aux_logits):
                torch.testing.assert_close(s, t[b:b + 1])
            torch.testing.assert_close(single.decoder_features[0], batched.decoder_features[0][b:b + 1])


@pytest.mark.parametrize("name", NAMES)
def test_one_hot_fusion_in_one_batched_call(name):
    """PASSION's M single-modality passes as one call over repeated features equal separate runs
    on features encoded with only that modality: nothing of the other modalities leaks through
    the transformer, the cross attention or the skips."""
    model, patch = tiny(name)
    x = images(2, patch)
    full = torch.ones(2, 4, dtype=torch.bool)
    onehot = torch.eye(4, dtype=torch.bool).repeat(2, 1)
    with torch.no_grad():
        batched = model.fuse(model.encode(x, full).repeat_each(4), onehot)
        for b in range(2):
            for m in range(4):
                only = onehot[m:m + 1]
                ref = model.fuse(model.encode(x[b:b + 1], only), only)
                torch.testing.assert_close(ref.logits, batched.logits[4 * b + m:4 * b + m + 1])
                torch.testing.assert_close(ref.aux_logits[-1], batched.aux_logits[-1][4 * b + m:4 * b + m + 1])


@pytest.mark.parametrize("name", NAMES)
def test_no_leakage_from_unavailable_images(name):
    model, patch = tiny(name)
    x = images(3, patch)
    changed = x.clone()
    changed[~MIXED] = images(3, patch, seed=7)[~MIXED] * 10
    with torch.no_grad():
        a, b = model(x, MIXED), model(changed, MIXED)
    assert torch.equal(a, b)
    # the features of an available modality do change the output (the test can fail)
    changed[0, 0] += 1
    with torch.no_grad():
        assert not torch.equal(model(changed, MIXED)[0], a[0])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_exactly_the_available_encoders(name):
    model, patch = tiny(name)
    model.train()
    mask = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    feats = model.encode(images(2, patch), mask)
    out = model.fuse(feats, mask)
    loss = out.logits.sum() + sum(a.sum() for a in out.aux_logits) + model.decode_single(feats, mask).sum()
    loss.backward()
    for m in range(4):
        params = model.modality_parameters(m)
        assert params
        grads = [p.grad for p in params]
        if mask[:, m].any():
            assert all(g is not None and g.abs().sum() > 0 for g in grads), m
        else:
            assert all(g is None or (g == 0).all() for g in grads), m


def test_m2ftrans_fusion_tokens_and_masked_attention():
    model, patch = tiny("m2ftrans", width=2)
    n = 4  # 32/16 = 2 per axis, 2D
    assert model.fusion_tokens.shape == (1, n, 32)  # 16 * base_width channels
    assert model.pos.weight.shape == (1, 5 * n, 32)  # M modality token sets + fusion tokens
    assert model.fusion_tokens.requires_grad and model.fusion_tokens.std() > 0.1  # normal init
    allowed = model.attention_mask(MIXED)
    assert allowed.shape == (3, 5 * n, 5 * n)
    group = torch.arange(5).repeat_interleave(n)
    for b in range(3):
        for q in range(5 * n):
            for k in range(5 * n):
                gq, gk = group[q], group[k]
                expect = bool(gq == gk or (gq == 4 and MIXED[b, gk]))
                assert bool(allowed[b, q, k]) == expect
    # fusion tokens change the output (they are used)
    x = images(1, patch)
    with torch.no_grad():
        before = model(x, MIXED[:1])
        model.fusion_tokens.add_(1.0)
        assert not torch.equal(model(x, MIXED[:1]), before)


def test_attention_key_mask_blocks_masked_tokens():
    torch.manual_seed(0)
    attn = Attention(8, heads=2).eval()
    x = torch.randn(2, 5, 8)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out, weights = attn(x, keep)
    assert (weights[0, :, :, 3:] == 0).all()
    y = x.clone()
    y[0, 3:] = 100.0  # masked keys/values of sample 0 must not matter for its first tokens
    out2, _ = attn(y, keep)
    torch.testing.assert_close(out2[0, :3], out[0, :3])
    torch.testing.assert_close(out2[1], out[1])


@pytest.mark.parametrize("name", NAMES)
def test_bad_configurations_fail_clearly(name):
    with pytest.raises(ValueError, match="patch_size"):
        build_model(name, num_modalities=4, num_classes=4, base_width=2, patch_size=(40, 40, 40), spatial_dims=3)
    with pytest.raises(ValueError, match="spatial_dims"):
        build_model(name, num_modalities=4, num_classes=4, base_width=2, patch_size=(32, 32), spatial_dims=3)
    model, patch = tiny(name)
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.zeros(1, 4, 64, 64, dtype=torch.float64), torch.ones(1, 4, dtype=torch.bool))
