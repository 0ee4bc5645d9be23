"""Where a model lives: qatkit's functions run a model where its weights are, so a model moved to a GPU
(TrainConfig.device, `--device cuda`) is evaluated and calibrated there without a device argument."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from qatkit.errors import ConfigError, bad_value


def check_available(device: str | torch.device) -> None:
    """Refuse a device name torch does not know, or a CUDA device this machine cannot run (torch built without CUDA,
    no GPU, or too few), before any work."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise bad_value("device", device, "'cpu', 'cuda' or 'cuda:N' (or a torch.device)",
                        "pass device='cpu'") from None
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.index is not None and device.index >= count or count == 0:
        why = ("this torch is built without CUDA" if torch.version.cuda is None else
               f"{count} GPU{'s' if count != 1 else ''} visible")
        raise ConfigError(f"device = {str(device)!r} is not available here ({why}); allowed: cpu"
                          + "".join(f", cuda:{i}" for i in range(count))
                          + ". Fix: pass --device cpu, or run on a machine with a GPU and a CUDA build of torch")


def check_dtype(model: nn.Module, doing: str) -> None:
    """Refuse a model whose floating-point parameters are neither float32 nor float64 (a bfloat16/float16 model, or
    a QAT model cast to one after prepare: its scales and integer arithmetic are float32's)."""
    if half := sorted({str(p.dtype) for p in model.parameters()
                       if p.is_floating_point() and p.dtype not in (torch.float32, torch.float64)}):
        raise bad_value("the model's parameter dtype", ", ".join(half).replace("torch.", ""), "float32 (or float64): "
                        "QAT learns float32 scales beside the weights it quantizes",
                        f"{doing} model.float(); for bfloat16 or float16 speed, train under torch.autocast")


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (cpu for a module with neither)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


class HostBuffers:
    """Mixin for an nn.Module: the buffers named in `host_buffers` (the flags and bit-widths its forward pass
    branches on) stay on the CPU when the module moves to a GPU. Reading a GPU tensor's value in Python
    (`if self.enabled`, `int(self.bits)`) makes the host wait for every queued kernel, at every layer of every
    step: the GPU then idles between launches (measured on an H200: ResNet-20's QAT step 6.1× the float step at
    batch 128 with the flags on the GPU). They still travel in the state_dict like any buffer."""

    host_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self.host_buffers:
            if self._buffers.get(name) is not None:
                self._buffers[name] = self._buffers[name].cpu()
        return self
