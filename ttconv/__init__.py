"""ttconv: convolution layers whose singular values you can see, clip and bound.

``SVDConv`` stores a 2-D convolution in tensor-train form ``U diag(S) core V^T`` with
orthonormal outer factors, so the layer's exact spectrum comes from its small core.
``SVDConv1d``, ``SVDConv3d`` and ``SVDConvTranspose1d/2d/3d`` do the same for torch's other
convolutions (``SVDConv2d`` is ``SVDConv``).
"""

from . import bounds, evaluate
from .control import SpectralControl, clip_singular_values_, scale_to_spectral_norm_, spectral_norm
from .convert import ConversionReport, convert, densify, load_converted
from .layer import (
    SVDConv,
    SVDConv1d,
    SVDConv2d,
    SVDConv3d,
    SVDConvTranspose1d,
    SVDConvTranspose2d,
    SVDConvTranspose3d,
)
from .report import SpectralReport, spectral_report, state_dict_report
from .spectra import MemoryLimitError, conv_singular_values, conv_spectral_norm
from .tt import decompose

__version__ = "0.1.0"

__all__ = [
    "SVDConv",
    "SVDConv1d",
    "SVDConv2d",
    "SVDConv3d",
    "SVDConvTranspose1d",
    "SVDConvTranspose2d",
    "SVDConvTranspose3d",
    "conv_singular_values",
    "conv_spectral_norm",
    "MemoryLimitError",
    "decompose",
    "bounds",
    "evaluate",
    "spectral_report",
    "state_dict_report",
    "SpectralReport",
    "convert",
    "densify",
    "load_converted",
    "ConversionReport",
    "clip_singular_values_",
    "scale_to_spectral_norm_",
    "spectral_norm",
    "SpectralControl",
    "__version__",
]
