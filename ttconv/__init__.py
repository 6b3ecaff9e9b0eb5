"""ttconv: convolution layers whose singular values you can see, clip and bound.

``SVDConv`` stores a 2-D convolution in tensor-train form ``U diag(S) core V^T`` with
orthonormal outer factors, so the layer's exact spectrum comes from its small core.
"""

from .layer import SVDConv
from .spectra import conv_singular_values, conv_spectral_norm
from .tt import decompose

__version__ = "0.1.0"

__all__ = ["SVDConv", "conv_singular_values", "conv_spectral_norm", "decompose", "__version__"]
