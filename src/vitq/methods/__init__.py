"""Built-in calibration methods and refiners; importing this module registers them."""

from vitq.methods import (  # noqa: F401
    aciq,
    apq,
    baselines,
    easyquant,
    evolq,
    lapq,
    mixed_quant,  # quantizer kind uniform_mixed
    ptq4vit,
    ptqvit,
    recon,
    repq,  # also registers the quantizer kinds logsqrt2, adalog
    softmax_quant,  # quantizer kinds twin, twin_gelu, mpq
)
