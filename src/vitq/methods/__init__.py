"""Built-in calibration methods and refiners; importing this module registers them."""

from vitq.methods import (  # noqa: F401,E402
    apq,
    baselines,  # noqa: F401
    ptq4vit,
    softmax_quant,  # noqa: F401  (quantizer kinds twin, twin_gelu, mpq)
)
