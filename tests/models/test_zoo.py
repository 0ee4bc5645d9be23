"""Every zoo model builds, runs, traces with torch.fx to the same outputs, and trains (finite grads)."""
from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from qatkit.errors import ConfigError
from qatkit.models import (
    MODEL_NAMES,
    TinyTransformer,
    build_model,
    mobilenet_v2,
    resnet18,
    resnet20,
)

INPUTS = {"digits-8x8x1": (1, 8), "cifar-32x32x3": (3, 32)}
NUM_CLASSES = 10
CIFAR = {"num_classes": 10, "in_channels": 3, "image_size": 32}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_trace_and_grads(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """Eager and traced outputs agree in eval mode; one training step gives finite grads everywhere."""
    model.eval()
    graph_module = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(graph_module(x), expected)
    assert expected.shape == (x.shape[0], NUM_CLASSES)

    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.arange(x.shape[0]) % NUM_CLASSES)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    return graph_module


@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_builds_traces_and_trains(name: str, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    channels, size = shape
    model = build_model(name, num_classes=NUM_CLASSES, in_channels=channels, image_size=size)
    graph_module = _check_trace_and_grads(model, torch.randn(2, channels, size, size))

    modules = dict(graph_module.named_modules())
    called = [node for node in graph_module.graph.nodes if node.op == "call_module"]
    targets = [node.target for node in called]
    # a module instance used twice (e.g. one shared ReLU) would share one set of QAT observers
    assert len(targets) == len(set(targets)), "some module is called more than once"
    # every BN directly follows a bias-free conv, the pattern QAT folds
    for node in called:
        if isinstance(modules[node.target], nn.BatchNorm2d):
            conv = node.args[0]
            assert conv.op == "call_module" and isinstance(modules[conv.target], nn.Conv2d), node.target
            assert modules[conv.target].bias is None, conv.target


def test_tiny_transformer_token_input() -> None:
    torch.manual_seed(0)
    model = TinyTransformer(NUM_CLASSES, vocab_size=50, max_len=12)
    _check_trace_and_grads(model, torch.randint(0, 50, (3, 12)))


def test_tiny_transformer_masks_padding() -> None:
    """Pads (id 0) take no part: neither their embedding nor their position changes a text's output."""
    torch.manual_seed(0)
    model = TinyTransformer(NUM_CLASSES, vocab_size=50, max_len=12).eval()
    ids = torch.randint(1, 50, (2, 12))
    ids[0, 5:] = 0  # a text of 5 tokens, one of 12
    with torch.no_grad():
        before = model(ids)
        model.embed.weight[0].normal_()
        model.pos_embed[0, 5:].normal_()  # positions only text 0 pads
        after = model(ids)
    assert torch.equal(after[0], before[0])
    assert not torch.equal(after[1], before[1])  # its tokens sit there


def test_parameter_counts() -> None:
    assert 260_000 <= _num_params(resnet20(10)) <= 280_000
    model = resnet18(1000)
    assert _num_params(model) == 11_689_512  # torchvision's resnet18
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.bias"} <= set(
        model.state_dict()
    )  # torchvision's names


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: build_model("resnet-20", **CIFAR), r"resnet-20.*did you mean 'resnet20'"),
        (lambda: build_model("vgg", **CIFAR), r"allowed: seed-mlp, small-cnn"),
        (lambda: build_model("resnet20", **{**CIFAR, "num_classes": 0}), r"num_classes = 0"),
        (lambda: mobilenet_v2(10, width_mult=0), r"width_mult = 0"),
        (lambda: TinyTransformer(10, image_size=32, in_channels=3), r"image_size, in_channels, patch_size"),
        (lambda: TinyTransformer(10, image_size=32, in_channels=3, patch_size=5), r"divisor of image_size=32"),
        (lambda: TinyTransformer(10, dim=30, vocab_size=5, max_len=4), r"multiple of heads=4"),
    ],
    ids=["typo", "unknown", "num_classes", "width_mult", "partial-input", "patch_size", "heads"],
)
def test_bad_options_raise_config_error(build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build()
