"""Fused Squeeze-and-Excitation (SE) and Squeeze-Aggregated-Excitation (SaE) layers."""

from .convert import convert, revert
from .dispatch import set_under_compile
from .functional import sae
from .layers import FusedEffectiveSE, FusedSaE, FusedSE
from .models import se_resnet, senetv2_resnet
from .options import ACTIVATIONS, GATES, OUTPUT_ACTIVATIONS
from .reference import SE, EffectiveSE, SaE, sae_reference

__all__ = [
    "ACTIVATIONS",
    "GATES",
    "OUTPUT_ACTIVATIONS",
    "SE",
    "EffectiveSE",
    "FusedEffectiveSE",
    "FusedSE",
    "FusedSaE",
    "SaE",
    "convert",
    "revert",
    "sae",
    "sae_reference",
    "se_resnet",
    "senetv2_resnet",
    "set_under_compile",
]
__version__ = "0.1.0"
