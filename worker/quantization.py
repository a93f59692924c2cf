"""The UNet's linear layers in float8 or int8 (the `unet_quant` lever, opt-in), with torchao:
weights quantized once at start, activations per row as they come (dynamic quantization), the
matrix products on the card's float8 or int8 tensor cores. Imported only when the lever is on."""

import logging
from typing import Literal, get_args

import torch

log = logging.getLogger(__name__)

UnetQuant = Literal["fp8", "int8"]
UNET_QUANTS: tuple[str, ...] = get_args(UnetQuant)
# Float8 matrix products need Ada or Hopper tensor cores.
_FLOAT8_CAPABILITY = (8, 9)


class QuantizationUnavailable(ValueError):
    """The lever asks for what this device cannot run."""


def quantize_unet(unet: torch.nn.Module, kind: UnetQuant, device: torch.device) -> int:
    """Quantize the UNet's linear layers in place (before it is compiled); the number of layers."""
    if kind == "fp8" and (
        device.type != "cuda" or torch.cuda.get_device_capability(device) < _FLOAT8_CAPABILITY
    ):
        raise QuantizationUnavailable(
            "T2I_UNET_QUANT=fp8 needs a CUDA card with float8 tensor cores (compute capability "
            "8.9 or later: Ada, Hopper, Blackwell); use int8, or leave it unset"
        )
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise QuantizationUnavailable(
            f"T2I_UNET_QUANT needs torchao, which does not import here ({exc}); install the "
            "worker's locked dependencies, or leave it unset"
        ) from exc

    config = (
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        if kind == "fp8"
        else Int8DynamicActivationInt8WeightConfig()
    )
    layers = sum(isinstance(module, torch.nn.Linear) for module in unet.modules())
    quantize_(unet, config)
    log.info("the UNet's %d linear layers quantized to %s", layers, kind)
    return layers
