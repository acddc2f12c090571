"""Contract tests for every registered backbone, at tiny shapes.

Each test is parametrized over ``list_models()``, so a backbone is tested as soon as it is
registered. Tiny configurations use M = 3 modalities and C = 3 classes on purpose: a
backbone that hard-codes the four BraTS modalities or classes fails here.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from passion.models import build_model, list_models

M, C = 3, 3
# Tiny per-backbone configuration; a backbone not listed gets the fallback.
TINY = {
    "rfnet": dict(base_width=4, patch_size=(16, 16, 16)),
    "mmformer": dict(base_width=4, patch_size=(32, 32, 32)),
    "m2ftrans": dict(base_width=4, patch_size=(32, 32, 32)),
}
TINY_FALLBACK = dict(base_width=8, patch_size=(32, 32, 32))
# Parameter counts of the reference implementations at the default configuration
# (4 modalities, 4 classes, base width 8, 80^3 patches).
REFERENCE_PARAMS = {"rfnet": 2_381_792, "mmformer": 35_599_184, "m2ftrans": 13_194_788}
MODELS = list_models()


def tiny(name: str, **over):
    cfg = dict(TINY.get(name, TINY_FALLBACK), num_modalities=M, num_classes=C, spatial_dims=3)
    cfg.update(over)
    torch.manual_seed(0)
    return build_model(name, **cfg).eval(), cfg


def images(cfg, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg["num_modalities"], *cfg["patch_size"], generator=g)


def all_subsets(m: int = M) -> torch.Tensor:
    rows = [bits for bits in itertools.product([False, True], repeat=m) if any(bits)]
    return torch.tensor(rows, dtype=torch.bool)


def one_hot_masks(batch: int, m: int = M) -> torch.Tensor:
    """Masks of PASSION's batched single-modality pass: sample b repeated m times with e_0..e_{m-1}."""
    return torch.eye(m, dtype=torch.bool).repeat(batch, 1)


def modality_params(model, m: int):
    assert hasattr(model, "modality_parameters"), (
        f"{type(model).__name__} must implement modality_parameters(m) (the parameters of modality m's "
        "encoder) so the gradient-routing contract can be tested")
    return list(model.modality_parameters(m))


def assert_close(a, b, atol=1e-4):
    """float32 agreement up to summation-order noise: batch-1 and batched conv / matmul kernels
    round differently (observed up to ~7e-5 on O(1) values); a mask leak is orders larger."""
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-3 if atol else 0)


@pytest.mark.parametrize("name", MODELS)
def test_every_subset_runs_with_contract_shapes(name):
    model, cfg = tiny(name)
    masks = all_subsets()
    b, spatial = masks.shape[0], cfg["patch_size"]
    x = images(cfg, b)
    with torch.no_grad():
        feats = model.encode(x, masks)
        out = model.fuse(feats, masks)
        sep = model.decode_single(feats, masks)
        logits = model(x, masks)
    assert all(f.shape[:2] == (b, M) for f in feats.scales)
    assert feats.scales[0].shape[3:] == spatial  # finest scale first
    assert out.logits.shape == (b, C, *spatial)
    assert_close(logits, out.logits)
    assert out.aux_logits, "auxiliary logits must not be empty"
    for aux in out.aux_logits:
        assert aux.shape[:2] == (b, C) and aux.dim() == 5
    assert out.aux_logits[0].shape[2:] == max(a.shape[2:] for a in out.aux_logits)  # finest first
    assert out.decoder_features[0].shape[0] == b and out.decoder_features[0].shape[2:] == spatial
    assert sep.shape == (b, M, C, *spatial)
    assert torch.isfinite(out.logits).all() and torch.isfinite(sep).all()
    # modalities off in the mask are skipped by the separate decoder (zeros)
    assert (sep[~masks] == 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_unavailable_modality_does_not_leak(name):
    model, cfg = tiny(name)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    x = images(cfg, 2)
    x2 = x.clone()
    x2[~mask] = 100.0 * torch.randn_like(x2[~mask])
    with torch.no_grad():
        f1, f2 = model.encode(x, mask), model.encode(x2, mask)
        for a, b in zip(f1.scales, f2.scales):
            assert_close(a, b, atol=0)
            assert (a[~mask] == 0).all(), "features of unavailable modalities must be zero"
        o1, o2 = model.fuse(f1, mask), model.fuse(f2, mask)
        assert_close(o1.logits, o2.logits, atol=0)
        assert_close(model.decode_single(f1, mask), model.decode_single(f2, mask), atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_fuse_zeroes_modalities_off_in_its_own_mask(name):
    """PASSION re-runs fuse with one-hot masks on features encoded with the full mask."""
    model, cfg = tiny(name)
    x = images(cfg, 1)
    full = torch.ones(1, M, dtype=torch.bool)
    with torch.no_grad():
        feats_full = model.encode(x, full)
        for m in range(M):
            only = torch.zeros(1, M, dtype=torch.bool)
            only[0, m] = True
            a = model.fuse(feats_full, only)
            b = model.fuse(model.encode(x, only), only)
            assert_close(a.logits, b.logits)
            for s, t in zip(a.aux_logits, b.aux_logits):
                assert_close(s, t)
            assert_close(a.decoder_features[0], b.decoder_features[0])


@pytest.mark.parametrize("name", MODELS)
def test_mixed_mask_batch_equals_one_by_one(name):
    model, cfg = tiny(name)
    x = images(cfg, 2)
    full = torch.ones(2, M, dtype=torch.bool)
    with torch.no_grad():
        feats = model.encode(x, full)
        # PASSION's batched single-modality pass: every sample repeated M times, one-hot masks,
        # plus two arbitrary subsets to mix mask sizes in one batch
        rep = feats.repeat_each(M)
        masks = one_hot_masks(2)
        masks[1] = torch.tensor([True, True, False])
        masks[4] = torch.tensor([False, True, True])
        batched = model.fuse(rep, masks)
        for i in range(masks.shape[0]):
            single = feats.map(lambda t: t[i // M:i // M + 1])
            ref = model.fuse(single, masks[i:i + 1])
            assert_close(batched.logits[i:i + 1], ref.logits)
            for s, t in zip(batched.aux_logits, ref.aux_logits):
                assert_close(s[i:i + 1], t)
            assert_close(batched.decoder_features[0][i:i + 1], ref.decoder_features[0])
        # encode and decode_single with per-sample masks equal the samples run alone
        mixed = torch.tensor([[True, False, True], [False, True, False]])
        f_mixed = model.encode(x, mixed)
        sep_mixed = model.decode_single(f_mixed, mixed)
        sep_all = model.decode_single(f_mixed)
        for i in range(2):
            f_i = model.encode(x[i:i + 1], mixed[i:i + 1])
            for a, b in zip(f_mixed.scales, f_i.scales):
                assert_close(a[i:i + 1], b)
            assert_close(sep_mixed[i:i + 1], model.decode_single(f_i, mixed[i:i + 1]))
        assert_close(sep_mixed[mixed], sep_all[mixed])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dims", [3, 2])
def test_fuse_single_equals_one_hot_fuse_in_values_and_gradients(name, dims):
    """fuse_single (PASSION's batched single-modality pass, possibly a backbone's own faster
    path) equals fuse with one-hot masks, and sends the same gradients to the features."""
    over = {} if dims == 3 else dict(spatial_dims=2, patch_size=TINY.get(name, TINY_FALLBACK)["patch_size"][:2])
    model, cfg = tiny(name, **over)  # every backbone has a 2D variant (MyoPS)
    # float64: the two paths sum in different orders, and fp32 rounding (~3e-5 on RFNet's 3D
    # gradients) would hide a real difference behind a loose tolerance
    model = model.double()
    x = images(cfg, 2).double()
    mask = torch.tensor([[True, True, False], [True, False, True]])
    b_idx, m_idx = mask.nonzero(as_tuple=True)
    feats = model.encode(x, mask)
    outs, grads = [], []
    for path in ("fuse_single", "fuse"):
        leaves = feats.map(lambda t: t.detach().clone().requires_grad_())
        if path == "fuse_single":
            out = model.fuse_single(leaves, b_idx, m_idx)
        else:
            rows = leaves.map(lambda t: t.index_select(0, b_idx))
            out = model.fuse(rows, torch.nn.functional.one_hot(m_idx, M).bool())
        loss = out.logits.square().mean() + sum(a.float().square().mean() for a in out.aux_logits)
        loss = loss + out.decoder_features[0].square().mean()
        loss.backward()
        outs.append(out)
        grads.append([t.grad for t in leaves.scales + list(leaves.extra.values())])
    fast, ref = outs
    assert_close(fast.logits, ref.logits)
    for s, t in zip(fast.aux_logits, ref.aux_logits):
        assert_close(s, t)
    for s, t in zip(fast.decoder_features, ref.decoder_features):
        assert_close(s, t)
    off = torch.ones(2, M, dtype=torch.bool)  # (sample, modality) rows outside the pairs
    off[b_idx, m_idx] = False
    assert any(g is not None for g in grads[1])
    for g_fast, g_ref in zip(*grads):
        assert (g_fast is None) == (g_ref is None)  # a feature the fusion does not read
        if g_ref is not None:
            assert_close(g_fast, g_ref)
            assert float(g_fast[off].abs().sum()) == 0.0


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_exactly_the_available_encoders(name):
    model, cfg = tiny(name)
    model.train()
    mask = torch.tensor([[True, False, False], [True, False, True]])  # modality 1 absent everywhere
    x = images(cfg, 2)
    feats = model.encode(x, mask)
    out = model.fuse(feats, mask)
    loss = out.logits.square().mean() + sum(a.square().mean() for a in out.aux_logits)
    loss = loss + model.decode_single(feats, mask).square().mean()
    loss.backward()

    def grad_norm(m):
        return sum(float(p.grad.abs().sum()) for p in modality_params(model, m) if p.grad is not None)

    assert grad_norm(0) > 0 and grad_norm(2) > 0
    assert grad_norm(1) == 0
    # a one-hot fuse on full-mask features reaches only that modality's encoder
    model.zero_grad(set_to_none=True)
    feats = model.encode(x, torch.ones(2, M, dtype=torch.bool))
    only = torch.zeros(2, M, dtype=torch.bool)
    only[:, 2] = True
    model.fuse(feats, only).logits.square().mean().backward()
    assert grad_norm(2) > 0 and grad_norm(0) == 0 and grad_norm(1) == 0


@pytest.mark.parametrize("name", MODELS)
def test_modality_parameters_are_disjoint(name):
    model, _ = tiny(name)
    seen = set()
    for m in range(M):
        ids = {id(p) for p in modality_params(model, m)}
        assert ids and not ids & seen
        seen |= ids


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_forward(name):
    model, cfg = tiny(name)
    x = images(cfg, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x, torch.tensor([[True, False, True]]))
    assert logits.shape == (1, C, *cfg["patch_size"]) and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("name", MODELS)
def test_two_dimensional_variant(name):
    model, cfg = tiny(name, spatial_dims=2, patch_size=TINY.get(name, TINY_FALLBACK)["patch_size"][:2])
    x = images(cfg, 2)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    with torch.no_grad():
        feats = model.encode(x, mask)
        out = model.fuse(feats, mask)
        sep = model.decode_single(feats, mask)
    assert out.logits.shape == (2, C, *cfg["patch_size"])
    assert sep.shape == (2, M, C, *cfg["patch_size"])


@pytest.mark.parametrize("name", MODELS)
def test_default_parameter_count_matches_reference(name):
    assert name in REFERENCE_PARAMS, f"record {name}'s parameter count at the paper's settings"
    model = build_model(name, num_modalities=4, num_classes=4, base_width=8, patch_size=(80, 80, 80),
                        spatial_dims=3)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", MODELS)
def test_kaiming_normal_conv_init(name):
    torch.manual_seed(0)
    model = build_model(name)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.weight.numel() >= 20000]
    assert convs
    w = max(convs, key=lambda m: m.weight.numel()).weight.detach()
    fan_in = w[0].numel()
    assert abs(float(w.std()) / (2.0 / fan_in) ** 0.5 - 1) < 0.1


def test_registry_errors_are_one_clear_line():
    with pytest.raises(ValueError) as exc:
        build_model("no_such_model")
    assert "no_such_model" in str(exc.value) and "\n" not in str(exc.value)
    for name in MODELS:
        with pytest.raises(ValueError) as exc:
            build_model(name, not_an_option=1)
        assert "not_an_option" in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------- RFNet specifics

def test_rfnet_rejects_bad_config_and_inputs():
    with pytest.raises(ValueError, match="base_width"):
        build_model("rfnet", base_width=3)
    with pytest.raises(ValueError, match="patch_size"):
        build_model("rfnet", patch_size=(20, 20, 20))
    with pytest.raises(ValueError, match="patch_size"):
        build_model("rfnet", patch_size=(16, 16), spatial_dims=3)
    model, cfg = tiny("rfnet")
    with pytest.raises(ValueError, match="mask"):
        model(images(cfg, 1), torch.ones(1, M + 1, dtype=torch.bool))


def test_rfnet_region_fusion_matches_reference_formula():
    """The contracted region-aware fusion equals the reference's materialised computation."""
    from passion.models.rfnet import RegionAwareFusion

    torch.manual_seed(0)
    b, m, c, r, s = 2, 3, 4, 3, 4
    rfm = RegionAwareFusion(c, m, r, dims=3).eval()
    y = torch.randn(b, m, c, s, s, s)
    y[0, 1] = 0  # a missing modality
    prior = torch.softmax(torch.randn(b, r, s, s, s), dim=1)
    # reference: split every modality into regions, pool, weight per modality, sum
    regions = []
    for i in range(r):
        feat = y * prior[:, None, i:i + 1]                       # [B, M, C, *S]
        p_avg = prior[:, i].mean(dim=(1, 2, 3)) + 1e-7           # [B]
        f_avg = feat.mean(dim=(3, 4, 5)) / p_avg[:, None, None]  # [B, M, C]
        vec = torch.cat((f_avg.reshape(b, m * c), p_avg[:, None]), dim=1).reshape(b, -1, 1, 1, 1)
        w = torch.sigmoid(rfm.weight_mlps[i](vec)).reshape(b, m, 1, 1, 1, 1)
        regions.append((feat * w).sum(dim=1))
    expected = torch.cat((rfm.region_merge(torch.stack(regions, dim=1).reshape(b, r * c, s, s, s)),
                          rfm.shortcut(y.reshape(b, m * c, s, s, s))), dim=1)
    with torch.no_grad():
        assert_close(rfm(y, prior), expected.detach())


def test_rfnet_default_component_counts():
    model = build_model("rfnet")
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(model.encoders) == 4 * 366_912
    assert count(model.decoder_fuse) + count(model.decoder_sep) == 2_381_792 - 4 * 366_912


@pytest.mark.parametrize("name", MODELS)
def test_one_modality_fusion_rows_and_the_single_modality_decoder_share_one_gather(name):
    model, cfg = tiny(name)
    x = images(cfg, 2)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    features = model.encode(x, mask)
    b_idx, m_idx = mask.nonzero(as_tuple=True)
    gathered = features.pair_scales(b_idx, m_idx)
    for level, scale in enumerate(features.scales):
        torch.testing.assert_close(gathered[level], scale[b_idx, m_idx], rtol=0, atol=0)
    calls = []
    original = features.pair_scales
    features.pair_scales = lambda b, m: calls.append(original(b, m)) or calls[-1]
    for stage in (lambda: model.fuse_teacher_and_singles(features, mask, b_idx, m_idx),
                  lambda: model.decode_single(features, mask)):
        calls.clear()
        stage()
        assert calls and all(c is gathered for c in calls), "a second copy of the pairs' features was gathered"
    every = torch.ones(2, M, dtype=torch.bool).nonzero(as_tuple=True)
    views = features.pair_scales(*every)  # every pair in row-major order: views of the stacked features
    assert all(v._base is s for v, s in zip(views, features.scales))


def test_pair_rows_gathers_and_scatters_whole_rows():
    from passion.models.interface import pair_rows
    t = torch.randn(2, 3, 4, 5, requires_grad=True)
    b_idx, m_idx = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 2])
    got, ref = pair_rows(t, b_idx, m_idx), t[b_idx, m_idx]
    assert torch.equal(got, ref)
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(got, t, g)[0], torch.autograd.grad(ref, t, g)[0])
    assert type(got.grad_fn).__name__ == "IndexSelectBackward0"  # not IndexBackward0's slow scatter
