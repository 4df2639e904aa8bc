"""Models: loading them (timm names with local weights, Hugging Face folders) and one module per model family.

Importing this package registers every built-in family (:mod:`vitq.models.family` holds the registry); the
generic path (:mod:`vitq.models.generic`) is the fallback, tried after the others.
"""

from vitq.models import (  # noqa: F401  (each registers its family)
    cait,
    convnext,
    eva,
    generic,
    hf,
    hf_convnext,
    levit,
    timm_cnn,
    timm_vit,
)
from vitq.models.family import FAMILIES, Family, TrunkParts, family_of, register_family
from vitq.models.loading import create_model, load_weights, read_state_dict, sha256_file

__all__ = ["FAMILIES", "Family", "TrunkParts", "create_model", "family_of", "load_weights", "read_state_dict",
           "register_family", "sha256_file"]
