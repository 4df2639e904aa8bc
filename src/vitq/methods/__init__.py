"""Built-in calibration methods and refiners; importing this module registers them."""

from vitq.methods import (  # noqa: F401
    apq,
    baselines,
    evolq,
    ptq4vit,
    ptqvit,
    recon,
    softmax_quant,  # quantizer kinds twin, twin_gelu, mpq
)
