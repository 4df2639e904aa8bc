"""Calibration methods: each fills every quantizer of a prepared model from calibration data. Importing this
package registers them."""

from vitq.methods import (  # noqa: F401
    aciq,
    apq,
    baselines,
    easyquant,
    equalize,
    lapq,
    ptq4vit,
    ptqvit,
    repq,
)
