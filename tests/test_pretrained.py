"""Offline pretrained loading (create_model across families: tests/test_factory.py; SyncBN: tests/test_sync.py)."""

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import timm_bninit as tb


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.fixture(scope="module")
def source_model():
    """A plain-BN resnet18 with 'trained' BN layers (non-default statistics, γ, β)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    with torch.no_grad():
        for bn in bn_layers(model):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="module")
def weight_files(source_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    state = source_model.state_dict()
    files = {"safetensors": root / "w.safetensors", "pth": root / "w.pth", "bin": root / "w.bin",
             "nested": root / "nested.pth"}
    save_file({k: v.contiguous() for k, v in state.items()}, files["safetensors"])
    torch.save(state, files["pth"])
    torch.save(state, files["bin"])
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, files["nested"])
    return files


@pytest.mark.parametrize("kind", ["safetensors", "pth", "bin", "nested"])
def test_keep_reproduces_the_source_model(kind, weight_files, source_model):
    model = tb.create_model("resnet18", "bn_gamma01", pretrained_file=weight_files[kind], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), source_model(x), rtol=0, atol=0)
    report = model.bninit_load_report
    assert len(report.loaded) == len(source_model.state_dict()) and not report.ignored and not report.initialised


def test_report_lists_classifier_and_variant_parameters(weight_files, source_model):
    model = tb.create_model("resnet18", "rbn", pretrained_file=weight_files["safetensors"], num_classes=4)
    report = model.bninit_load_report
    assert "fc.weight" in report.initialised and "fc.bias" in report.initialised
    assert "(10, 512) in the source, (4, 512) in the model" in report.ignored["fc.weight"]
    assert "RepresentativeBatchNorm2d centering_weight" in report.initialised["layer1.0.bn1.centering_weight"]
    n_rbn = len(bn_layers(model))
    assert sum(k.endswith(("centering_weight", "scaling_weight", "scaling_bias")) for k in report.initialised) \
        == 3 * n_rbn
    # standard BN tensors really landed in RBN, extras kept their init
    torch.testing.assert_close(model.bn1.running_var, source_model.bn1.running_var)
    torch.testing.assert_close(model.bn1.weight, source_model.bn1.weight)
    assert torch.all(model.bn1.scaling_bias == 1) and torch.all(model.bn1.centering_weight == 0)
    every_key = set(model.state_dict())
    assert every_key == set(report.loaded) | set(report.initialised)
    assert f"{len(report.loaded)} tensors loaded" in report.summary() and "2 ignored" in report.summary()


def test_reset_and_scale_policies_through_loading(weight_files, source_model):
    with pytest.warns(tb.BNTransferWarning, match="recalibrate_bn_stats"):
        reset = tb.create_model("resnet18", "bn_gamma025", pretrained_file=weight_files["pth"], bn_transfer="reset")
    assert all(torch.all(bn.weight == 0.25) for bn in bn_layers(reset))
    assert "bn1.weight" in reset.bninit_load_report.initialised
    with pytest.warns(tb.BNTransferWarning):
        scaled = tb.create_model("resnet18", "bn_gamma01", pretrained_file=weight_files["pth"], bn_transfer="scale")
    for new, old in zip(bn_layers(scaled), bn_layers(source_model)):
        torch.testing.assert_close(new.weight, old.weight * 0.1)
        torch.testing.assert_close(new.running_mean, old.running_mean)
    assert scaled.bninit_load_report.transferred["bn1.weight"] == "scaled by γ0=0.1"


def test_blend_reports_dropped_gamma(weight_files):
    model = tb.create_model("resnet18", "bn_blend05", pretrained_file=weight_files["pth"])
    assert model.bninit_load_report.ignored["bn1.weight"] == "the layer has no γ (blended-σ BN)"


def test_hub_code_path_with_a_local_file(weight_files, source_model):
    # the timm hub path (pretrained=True) reading a local file through timm's own pretrained_cfg overlay
    model = tb.create_model("resnet18", "iebn_unit", pretrained=True, num_classes=5,
                            pretrained_cfg_overlay={"file": str(weight_files["safetensors"]), "num_classes": 10})
    assert "w.safetensors" in model.bninit_load_report.source
    torch.testing.assert_close(model.conv1.weight, source_model.conv1.weight)
    assert "fc.weight" in model.bninit_load_report.initialised


def test_unreachable_hub_says_to_pass_a_file(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(tb.PretrainedLoadError, match="pass a local weights file: pretrained_file=PATH"):
        tb.create_model("resnet18", "bn_gamma01", pretrained=True)


def test_bad_weight_files_get_clear_errors(tmp_path):
    with pytest.raises(tb.PretrainedLoadError, match="does not exist"):
        tb.load_state_dict_file(tmp_path / "missing.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(tb.PretrainedLoadError, match=r"unknown extension '\.npz'"):
        tb.load_state_dict_file(tmp_path / "w.npz")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(tb.PretrainedLoadError, match=r"could not read weights file .*corrupt.pth"):
        tb.load_state_dict_file(tmp_path / "corrupt.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(tb.PretrainedLoadError, match="without tensors"):
        tb.load_state_dict_file(tmp_path / "meta.pth")
    with pytest.raises(ValueError, match=r"either pretrained .* or pretrained_file"):
        tb.create_model("resnet18", pretrained=True, pretrained_file=tmp_path / "w.pth")
