"""Built-in calibration methods and refiners; importing this module registers them."""

import vitq.methods.ptqvit  # noqa: F401
from vitq.methods import baselines  # noqa: F401
