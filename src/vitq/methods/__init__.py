"""Built-in calibration methods and refiners; importing this module registers them."""

from vitq.methods import (  # noqa: F401
    apq,
    baselines,
    evolq,
    ptq4vit,
    ptqvit,
    recon,
    repq,  # also registers the quantizer kinds logsqrt2, adalog
    softmax_quant,  # quantizer kinds twin, twin_gelu, mpq
)
