"""Refiners: steps that improve an already-calibrated model (Evol-Q, block reconstruction), GPTQ weight
rounding and Evol-Q's loss landscape. Importing this package registers the refiners."""

from vitq.refine import bias_correct, evolq, recon, ridge  # noqa: F401  (each registers its refiner)
