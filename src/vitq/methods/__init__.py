"""Built-in calibration methods and refiners; importing this module registers them."""

from vitq.methods import baselines  # noqa: F401
