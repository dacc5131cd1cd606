"""Model patching: convert_norm policies, fused layers, families without norm_layer=, BN recalibration."""

import copy
import warnings

import pytest
import timm
import torch
from torch import nn
from variants import distinct_forms, factory, names

import timm_bninit as tb


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def pretrained_like(arch, seed=0, **kwargs):
    """A model whose BN layers look trained: non-default statistics, γ and β."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=7, **kwargs).double().eval()
    with torch.no_grad():
        for bn in bn_layers(model):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.num_batches_tracked.fill_(1000)
    return model


def computes_bn_at_init(name: str) -> bool:
    """Whether the variant computes exactly what BN does with the same γ (keep then preserves the model): it has a γ
    and its calibration, if any, starts as the identity."""
    layer = factory(name)(4)
    return isinstance(layer.weight, nn.Parameter) and getattr(layer, "initial_scale", 1.0) == 1.0


KEEP_EXACT = [name for name in distinct_forms() if computes_bn_at_init(name)]


def test_keep_exact_variants_are_the_identity_start_ones():
    # BN at init (docs/methods.md §9): the γ-init and uniform variants, and only the _unit forms of RBN and IEBN
    assert {type(factory(name)(4)).__name__ for name in KEEP_EXACT} == {
        "BatchNormGamma2d", "BatchNormUniformGamma2d", "RepresentativeBatchNorm2d", "InstanceEnhancementBatchNorm2d"}
    assert all(factory(name)(4).identity_init for name in KEEP_EXACT if name in names("calibrated"))


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenetv3_small_050", "vgg11_bn", "dla34",
                                  "rexnet_100", "regnetx_002"])
def test_keep_preserves_eval_outputs(arch):
    model = pretrained_like(arch)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = model(x)
    for name in KEEP_EXACT:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # keep must not warn about stale statistics
            converted = tb.convert_norm(copy.deepcopy(model), name, bn_transfer="keep")
        layers = bn_layers(converted)
        assert layers and all(isinstance(m, tb.BatchNormVariant) for m in layers), name
        torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-10, msg=f"{arch} {name}")
        del converted


def test_fused_layers_keep_their_activation_and_drop_path():
    model = pretrained_like("efficientnet_b0")
    acts = {name: type(m.act) for name, m in model.named_modules() if isinstance(m, timm.layers.BatchNormAct2d)}
    converted = tb.convert_norm(model, "rbn")
    fused = {name: m for name, m in converted.named_modules() if isinstance(m, tb.RepresentativeBatchNormAct2d)}
    assert set(fused) == set(acts)
    assert {name: type(m.act) for name, m in fused.items()} == acts
    assert nn.SiLU in acts.values()


def test_reset_and_scale_policies_set_gamma_and_warn_about_statistics():
    model = pretrained_like("resnet18")
    source_gammas = [bn.weight.detach().clone() for bn in bn_layers(model)]
    with pytest.warns(tb.BNTransferWarning, match="recalibrate_bn_stats"):
        reset = tb.convert_norm(copy.deepcopy(model), "bn_gamma01", bn_transfer="reset")
    assert all(torch.all(bn.weight == 0.1) for bn in bn_layers(reset))
    with pytest.warns(tb.BNTransferWarning):
        scaled = tb.convert_norm(copy.deepcopy(model), "bn_gamma025", bn_transfer="scale")
    for bn, gamma in zip(bn_layers(scaled), source_gammas):
        torch.testing.assert_close(bn.weight.detach(), gamma * 0.25, rtol=0, atol=0)
    # statistics and β carried over untouched
    for old, new in zip(bn_layers(model), bn_layers(scaled)):
        assert torch.equal(old.running_mean, new.running_mean) and torch.equal(old.bias, new.bias)


def test_fresh_model_reset_does_not_warn():
    model = timm.create_model("resnet18", num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tb.convert_norm(model, "bn_gamma01", bn_transfer="reset")


def test_policy_errors_are_clear():
    model = pretrained_like("resnet18")
    with pytest.raises(ValueError, match="unknown bn_transfer 'shrink'; choose one of keep, reset, scale"):
        tb.convert_norm(model, "rbn", bn_transfer="shrink")
    with pytest.raises(ValueError, match=r"needs a numeric γ0.*use 'keep' or 'reset'"):
        tb.convert_norm(model, "bn_uniform", bn_transfer="scale")
    with pytest.raises(tb.UnknownNormLayerError, match="Did you mean 'bn_gamma01'"):
        tb.convert_norm(model, "bn_gama01")


def test_flags_mode_device_dtype_and_kwargs_carry_over():
    model = pretrained_like("resnet18")
    model.bn1.weight.requires_grad_(False)
    model.layer1.train()
    converted = tb.convert_norm(model, "bn_gamma01", gamma_lr_div=7.0)
    assert not converted.bn1.weight.requires_grad and converted.bn1.bias.requires_grad
    assert converted.layer1[0].bn1.training and not converted.bn1.training
    assert converted.bn1.running_mean.dtype == torch.float64
    assert {bn.gamma_lr_div for bn in bn_layers(converted)} == {7.0}


def test_blend_conversion_drops_gamma_with_a_warning():
    model = pretrained_like("resnet18")
    with pytest.warns(tb.BNTransferWarning):
        converted = tb.convert_norm(model, "bn_blend05")
    assert all(not isinstance(bn.weight, nn.Parameter) for bn in bn_layers(converted))


def test_features_only_model_converts():
    model = timm.create_model("resnet18", features_only=True, out_indices=(1, 3))
    converted = tb.convert_norm(model, "iebn")
    features = converted(torch.randn(2, 3, 32, 32))
    assert [f.shape[1] for f in features] == [64, 256]
    assert all(isinstance(bn, tb.InstanceEnhancementBatchNorm2d) for bn in bn_layers(converted))


def test_calibration_batches_recalibrate_instead_of_warning():
    model = pretrained_like("resnet18")
    batches = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = tb.convert_norm(model, "bn_gamma01", "reset", calibration_batches=batches)
    stem = torch.cat([converted.conv1(b) for b in batches])
    # equal batch sizes: the average of batch means is the mean over all samples
    torch.testing.assert_close(converted.bn1.running_mean, stem.mean((0, 2, 3)))


def test_recalibrate_bn_stats_is_the_average_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).double()
    model[1].momentum = 0.3
    model.train()
    batches = [(torch.randn(5, 3, 8, 8, dtype=torch.float64) * (i + 1), torch.zeros(5)) for i in range(3)]
    used = tb.recalibrate_bn_stats(model, batches)
    assert used == 3
    conv = [model[0](x) for x, _ in batches]
    means = torch.stack([c.mean((0, 2, 3)) for c in conv])
    vars_unbiased = torch.stack([c.var((0, 2, 3), unbiased=True) for c in conv])
    torch.testing.assert_close(model[1].running_mean, means.mean(0))
    torch.testing.assert_close(model[1].running_var, vars_unbiased.mean(0))
    assert model[1].momentum == 0.3 and model.training and model[2].training
    assert int(model[1].num_batches_tracked) == 0  # counter restored


def test_recalibrate_with_no_batches_leaves_statistics_alone():
    model = pretrained_like("resnet18")
    before = model.bn1.running_mean.clone()
    with pytest.raises(ValueError, match="no batches"):
        tb.recalibrate_bn_stats(model, [])
    assert torch.equal(model.bn1.running_mean, before)


def test_recalibrate_restores_blend_previous_std():
    with pytest.warns(tb.BNTransferWarning):
        model = tb.convert_norm(pretrained_like("resnet18"), "bn_blend05", "reset")
    model.train()
    model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    prev = model.bn1.prev_std.clone()
    tb.recalibrate_bn_stats(model, [torch.randn(4, 3, 32, 32, dtype=torch.float64)])
    assert torch.equal(model.bn1.prev_std, prev)
