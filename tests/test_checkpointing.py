"""train.activation_checkpointing: every backbone, every mode, the same PASSION step (float64),
less memory saved for backward, unchanged parameter names, and config validation."""
from __future__ import annotations

import pytest
import torch

from passion.config import ConfigError, ObjectiveConfig, load_config
from passion.method import build_objective
from passion.models import build_model, list_models

M, C = 3, 3
TINY = {"rfnet": dict(base_width=4, patch_size=(16, 16, 16)),
        "mmformer": dict(base_width=4, patch_size=(32, 32, 32)),
        "m2ftrans": dict(base_width=4, patch_size=(32, 32, 32))}
pytestmark = pytest.mark.usefixtures("seed_and_one_thread")


def tiny(name: str, mode: str):
    torch.manual_seed(0)
    cfg = dict(TINY.get(name, dict(base_width=8, patch_size=(32, 32, 32))), num_modalities=M, num_classes=C)
    model = build_model(name, **cfg).double().train()  # train mode: dropout on, recomputation must replay it
    model.set_activation_checkpointing(mode)
    return model, cfg


def passion_step(model, cfg, saved: list[int] | None = None):
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.randn(2, M, *cfg["patch_size"], dtype=torch.float64, generator=g),
             "target": torch.randint(0, C, (2, *cfg["patch_size"]), generator=g),
             "mask": torch.tensor([[True, False, True], [True, True, True]])}
    obj = build_objective("passion", ObjectiveConfig(), M, ["a", "b", "c"], [4, 4, 4], 10, "idt")

    def pack(t):  # bytes autograd keeps for backward outside checkpointed blocks
        if saved is not None:
            saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(7)  # the same dropout draws for every mode
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = obj(model, batch, 0)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list_models())
def test_every_mode_gives_the_same_values_and_gradients(name):
    results, saved = {}, {}
    for mode in ("off", "decoder", "all"):
        model, cfg = tiny(name, mode)
        saved[mode] = []
        results[mode] = passion_step(model, cfg, saved[mode])
    loss_off, grads_off = results["off"]
    for mode in ("decoder", "all"):
        loss, grads = results[mode]
        torch.testing.assert_close(loss, loss_off, rtol=1e-12, atol=0)
        assert grads.keys() == grads_off.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], grads_off[k], rtol=1e-10, atol=1e-14, msg=f"{mode}: {k}")
    assert sum(saved["all"]) < sum(saved["decoder"]) < 0.7 * sum(saved["off"])


@pytest.mark.parametrize("name", list_models())
def test_modes_wrap_blocks_and_keep_parameter_names(name):
    model, _ = tiny(name, "off")
    keys = list(model.state_dict())
    wrapped = lambda: [m for m in model.modules() if "forward" in m.__dict__]  # noqa: E731
    assert wrapped() == []
    model.set_activation_checkpointing("decoder")
    in_decoder = wrapped()
    encoder_ids = {id(m) for root in model.encoder_modules() for m in root.modules()}
    assert in_decoder and not any(id(m) in encoder_ids for m in in_decoder)
    model.set_activation_checkpointing("all")
    assert len(wrapped()) > len(in_decoder) and any(id(m) in encoder_ids for m in wrapped())
    assert list(model.state_dict()) == keys
    model.set_activation_checkpointing("off")
    assert wrapped() == []
    with pytest.raises(ValueError, match="off, decoder, all"):
        model.set_activation_checkpointing("encoder")


def test_backbone_without_declared_blocks_is_a_clear_error():
    from fakes import FakeBackbone

    model = FakeBackbone()
    model.set_activation_checkpointing("off")
    with pytest.raises(ValueError, match="FakeBackbone declares no checkpoint_blocks"):
        model.set_activation_checkpointing("decoder")


@pytest.mark.parametrize("mode", ["decoder", "all"])
def test_all_mode_recomputes_the_loss_terms(mode):
    """Under `all` a loss term keeps nothing for backward beyond its inputs (its probabilities,
    logs and upsampled aux maps are recomputed); under `decoder` they are kept. Same gradients."""
    from passion.method import losses as L
    from passion.method.objectives.terms import fused_losses
    from passion.models.interface import FusedOutput

    model, _ = tiny("rfnet", mode)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, C, 8, 8, 8, dtype=torch.float64, generator=g, requires_grad=True)
    aux = [torch.randn(2, C, 4, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)]
    y = L.one_hot(torch.randint(0, C, (2, 8, 8, 8), generator=g), C).double()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        l_fuse, l_aux = fused_losses(model, FusedOutput(logits=logits, aux_logits=aux), y)
    grads = torch.autograd.grad(l_fuse + l_aux, [logits, *aux])
    expected = torch.autograd.grad(L.seg_loss(torch.softmax(logits, 1), y).mean() + L.aux_seg_loss(aux, y).mean(),
                                   [logits, *aux])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    inputs = {t.data_ptr() for t in (logits, y, *aux)}
    intermediates = [tuple(t.shape) for t in saved if t.data_ptr() not in inputs]
    if mode == "all":
        assert intermediates == []
    else:
        assert sum(shape == tuple(logits.shape) for shape in intermediates) >= 4, intermediates


def _rfnet_up_and_merge(model):
    block = model.decoder_sep.blocks[0]
    return block.up, block.combine


DECODER_LEVEL0 = {  # (up-convolution, merge) of the finest decoder level: their input is 2w channels
    "rfnet sep": (_rfnet_up_and_merge, 8),  # 8w -> 4w in RFNet's decoder
    "mmformer sep": (lambda m: tuple(m.decoder_sep.ups[0][:2]), 2),
    "mmformer fuse": (lambda m: (m.decoder_fuse.up_convs[0], m.decoder_fuse.merge[0]), 2),
    "m2ftrans sep": (lambda m: tuple(m.decoder_sep.ups[0][:2]), 2),
    "m2ftrans fuse": (lambda m: (m.decoder_fuse.up_convs[0], m.decoder_fuse.merge[0]), 2),
}


@pytest.mark.parametrize("decoder", DECODER_LEVEL0)
def test_checkpointed_decoder_blocks_keep_neither_the_upsampled_map_nor_the_concatenation(decoder):
    get_blocks, factor = DECODER_LEVEL0[decoder]
    model, cfg = tiny(decoder.split()[0], "decoder")
    up, merge = get_blocks(model)
    width = cfg["base_width"] * factor // 2  # output width of the level; its inputs have twice that
    x = torch.randn(1, 2 * width, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(1, width, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    saved: list[tuple] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = merge(up(x, skip), skip)
    assert (1, 2 * width, 4, 4, 4) not in saved, saved  # neither up(x) before its conv nor cat(up, skip)
    y.sum().backward()
    assert x.grad is not None and skip.grad is not None


@pytest.mark.parametrize("name", ["mmformer", "m2ftrans"])
def test_all_mode_encoder_stage_keeps_only_its_input(name):
    model, cfg = tiny(name, "all")
    stage = model.encoders[0].stages[1]  # w -> 2w channels, stride 2
    width = cfg["base_width"]
    x = torch.randn(1, width, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    saved: list[tuple] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = stage(x)
    assert (1, 2 * width, 4, 4, 4) not in saved, saved  # neither c1(x) nor c2(c1(x))
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", ["mmformer", "m2ftrans"])
def test_fusion_block_is_one_checkpoint_unit_over_both_kinds_of_rows(name):
    from passion.models.rows import Rows

    model, cfg = tiny(name, "decoder")
    w = cfg["base_width"]
    full = torch.randn(1, M, w, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    single = torch.randn(2, w, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    present = torch.tensor([0, 2])
    rows = Rows(full, single, present)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if name == "mmformer":
            y = model.decoder_fuse.fusion[0](rows)
        else:
            mask = torch.tensor([[True, False, True], [True, False, False], [False, False, True]])
            y = model.decoder_fuse.conv_fusion[0](rows, mask)
    big = [t for t in saved if t.numel() >= single.numel()]
    assert {t.data_ptr() for t in big} <= {full.data_ptr(), single.data_ptr()}, [tuple(t.shape) for t in big]
    y.sum().backward()
    assert full.grad is not None and single.grad is not None


@pytest.mark.parametrize("name", list_models())
def test_per_row_blocks_are_recomputed_one_row_at_a_time(name, monkeypatch):
    """PASSION's batched teacher and student pass gives the decoder's blocks several rows; a block
    the backbone declares per-row is checkpointed (and so recomputed in backward) row by row.
    test_every_mode_gives_the_same_values_and_gradients covers the values."""
    from passion.models import checkpointing
    from passion.models.rows import Rows

    calls: list[tuple[str, int, bool]] = []

    def recording(fn, *args, **kwargs):
        rows = {a.num_rows if isinstance(a, Rows) else a.shape[0] for a in args
                if isinstance(a, Rows) or isinstance(a, torch.Tensor) and a.dim()}
        calls.append((type(fn.__self__).__name__, max(rows, default=0), isinstance(fn.__self__, per_row)))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint", recording)
    model, cfg = tiny(name, "all")
    per_row = tuple(model.per_row_blocks)
    assert per_row and set(per_row) <= set(model.checkpoint_blocks)
    passion_step(model, cfg)  # 2 samples, 5 available modalities: 2 teacher + 5 student rows
    assert {rows for _, rows, is_per_row in calls if is_per_row} == {1}
    others = [rows for _, rows, is_per_row in calls if not is_per_row]  # attention blocks: all rows at once
    assert not others or max(others) > 1
    wrapped = [m for m in model.modules() if isinstance(m, per_row) and "forward" in m.__dict__]
    assert sum(is_per_row for *_, is_per_row in calls) > len(wrapped)  # several rows were split


def test_per_row_blocks_take_all_rows_at_once_when_asked(monkeypatch):
    """row_at_a_time=False (a benchmark's switch for the memory / kernel-count trade-off on a GPU):
    per-row blocks see every row in one call, and the step is the same as without checkpointing."""
    from passion.models import checkpointing

    most_rows: list[int] = []

    def recording(fn, *args, **kwargs):
        if isinstance(fn.__self__, per_row):
            most_rows.append(max((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim()), default=0))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint", recording)
    model, cfg = tiny("rfnet", "off")
    per_row = tuple(model.per_row_blocks)
    loss_off, grads_off = passion_step(model, cfg)
    model.set_activation_checkpointing("all", row_at_a_time=False)
    loss, grads = passion_step(model, cfg)
    assert max(most_rows) > 1
    torch.testing.assert_close(loss, loss_off, rtol=1e-12, atol=0)
    for k in grads_off:
        torch.testing.assert_close(grads[k], grads_off[k], rtol=1e-10, atol=1e-14, msg=k)


def test_rows_of_a_call_need_one_shared_leading_size():
    from passion.models.checkpointing import _rows
    from passion.models.rows import Rows

    a, b = torch.zeros(3, 2), torch.zeros(3, 5, 5)
    rows = Rows(torch.zeros(1, 2, 2), torch.zeros(2, 2), torch.tensor([0, 1]))  # 1 full + 2 single rows
    assert _rows((a, b, (4, 4), None)) == 3
    assert _rows((rows, a)) == 3
    assert _rows((a, torch.zeros(2, 2))) == 1  # different leading sizes: not rows of one batch
    assert _rows((a, torch.tensor(1.0))) == 1
    assert _rows((a, [b, b])) == 1  # a list of tensors might hold rows of its own
    assert _rows(((4, 4),)) == 1
    one = rows.one_per_row()
    assert [r.num_full for r in one] == [1, 0, 0] and [r.num_rows for r in one] == [1, 1, 1]
    assert [int(r.present) for r in one[1:]] == [0, 1]


def test_no_checkpointing_without_grad():
    model, cfg = tiny("rfnet", "all")
    x = torch.randn(1, M, *cfg["patch_size"], dtype=torch.float64)
    with torch.no_grad():
        out = model(x, torch.ones(1, M, dtype=torch.bool))
    assert out.shape[1] == C


def test_config_values():
    assert load_config(overrides=["train.activation_checkpointing=off"]).train.activation_checkpointing == "off"
    assert load_config(overrides=["train.activation_checkpointing=all"]).train.activation_checkpointing == "all"
    assert load_config().train.activation_checkpointing == "off" and load_config().train.compile is False
    with pytest.raises(ConfigError, match="train.activation_checkpointing must be one of off, decoder, all"):
        load_config(overrides=["train.activation_checkpointing=encoder"])
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        load_config(overrides=["train.activation_checkpointing=on"])
    with pytest.raises(ConfigError, match="train.compile must be true or false"):
        load_config(overrides=["train.compile=maybe"])


def test_trainer_passes_the_option(tiny_data, tmp_path, monkeypatch):
    """The trainer builds the backbone with the configured mode; losses are the off run's."""
    from training_helpers import safe_records, tiny_overrides

    from passion.engine.trainer import train
    from passion.models import Backbone

    modes, original = [], Backbone.set_activation_checkpointing
    monkeypatch.setattr(Backbone, "set_activation_checkpointing",
                        lambda self, mode: (modes.append(mode), original(self, mode))[1])
    losses = {}
    for mode in ("off", "all"):
        run = tmp_path / mode
        train(load_config(None, tiny_overrides(tiny_data, run, **{
            "train.epochs": 1, "train.iters_per_epoch": 2, "train.val_cases": 0,
            "train.activation_checkpointing": mode})))
        losses[mode] = [r["loss"] for r in safe_records(run) if r.get("type") == "iter"]
    assert modes == ["off", "all"] and len(losses["off"]) == 2
    assert losses["all"] == pytest.approx(losses["off"], rel=1e-5)
