"""The options of PTQ-ViT (:mod:`vitq.methods.ptqvit`), shared by its search (:mod:`vitq.methods.ptqvit_problem`)
and its mixed precision (:mod:`vitq.methods.ptqvit_mp`).

Every field gives the flag ``--ptqvit-<field>``; the mixed-precision target also keeps its old, shorter flag
``--mixed-precision`` (an alias of ``--ptqvit-mixed-precision``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vitq.options import OptionError, Options, opt

CALIBRATION_MODES = ("sequential", "parallel")
WEIGHT_GRANULARITIES = ("channel", "tensor")
MP_SENSITIVITIES = ("relative", "raw", "softmax")
CHANNEL_SEARCHES = ("shared", "own")
INPUT_GRIDS = ("symmetric", "asymmetric")
FQ_INITS = ("minmax", "omse")


@dataclass(frozen=True)
class PtqvitOptions(Options):
    candidates: int = opt(100, "interval candidates per step, in [low·Δ₀, high·Δ₀]", minimum=1, metavar="C")
    rounds: int = opt(20, "at most R alternating rounds per layer", minimum=1, metavar="R")
    low: float = opt(0.5, "lower end of the candidate range, times Δ₀", above=0)
    high: float = opt(1.2, "upper end of the candidate range, times Δ₀")
    ranking: bool = opt(True, "the ranking-aware term of the attention scores (off: ablation)")
    gamma: float = opt(0.1, "weight γ of the ranking loss")
    theta: float = opt(0.2, "hinge margin θ of the ranking loss")
    pairs: int = opt(256, "pairs (i<j) of a score row sampled once per layer, shared by all rows; 0 = all pairs",
                     minimum=0, metavar="P")
    bias_corr: bool = opt(True, "the output bias correction (off: ablation)")
    calibration: str = opt("sequential", "layer inputs from the already-quantized earlier layers (sequential) or "
                           "from the float model (parallel)", choices=CALIBRATION_MODES)
    images: int | None = opt(None, "use the first N calibration images for the search (None: all)", minimum=1,
                             metavar="N")
    tokens: int = opt(64, "token positions cached per sample for linear layers", minimum=1, metavar="T")
    rows: int = opt(32, "query rows cached per sample and head for the attention matmuls", minimum=1, metavar="R")
    softmax_signed: bool = opt(False, "quantize the softmax output with a signed symmetric quantizer as the paper "
                               "does (default: unsigned with zero point 0, since it lies in [0, 1]; the signed grid "
                               "wastes half its codes)")
    mixed_precision: int | None = opt(None, "mixed precision with this average weight bit width (e.g. 6 or 8): one "
                                      "bit width per block MSA and MLP from {BITS-2..BITS+2}", metavar="BITS",
                                      aliases=("--mixed-precision",))
    mp_candidates: int = opt(20, "candidates of the reduced search that estimates Ω", minimum=1, metavar="C")
    mp_rounds: int = opt(1, "rounds of the reduced search that estimates Ω", minimum=1, metavar="R")
    mp_images: int | None = opt(None, "mixed precision: allocate on the first N calibration images (None: those of "
                                "the search)", minimum=1, metavar="N")
    mp_no_check: bool = opt(False, "mixed precision: keep the program's allocation even when it gives a larger KL "
                            "to float than the uniform allocation of the same size on the allocation images "
                            "(ablation; by default the uniform one is used then)")
    fq_init: str = opt("omse", "fq: range of the quantizers that are not searched (scores, LayerNorm inputs, "
                       "residual)", choices=FQ_INITS)
    chunk_elements: int = opt(2**23, "elements of one chunk of candidate outputs evaluated at once", minimum=1,
                            metavar="N")
    weight_granularity: str = opt("channel", "one weight interval per output channel (channel: wins on held-out "
                                  "images at W6) or per tensor (tensor, the paper's)", metavar="channel|tensor")
    mp_sensitivity: str = opt("relative", "mixed precision: module sensitivity sigma = nuclear norm of the QK^T "
                              "scores (MSA) or of the output (MLP), each divided by its mean over the model's MSAs / "
                              "MLPs (relative), unnormalised (raw), or the old post-softmax-map form (softmax)",
                              choices=MP_SENSITIVITIES)
    channel_search: str = opt("shared", "per-channel weights: one factor of every channel's max shared by all "
                              "channels (shared), or also each channel's own factor by its output error (own; "
                              "overfits the calibration tokens on DeiT-Tiny)", metavar="shared|own")
    input_grid: str = opt("asymmetric", "grid of every linear layer's input, per tensor: unsigned with a zero point "
                          "covering the observed [min, max], scaled about zero by the search (asymmetric: the "
                          "post-GELU fc2 input uses all codes) or signed symmetric (symmetric, the paper's)",
                          metavar="symmetric|asymmetric")

    def check(self) -> None:
        # the phrases in these messages ("weight granularity", ...) are what the errors have always said
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise OptionError("weight_granularity", self.weight_granularity,
                              f"a weight granularity, one of {', '.join(WEIGHT_GRANULARITIES)}")
        if self.channel_search not in CHANNEL_SEARCHES:
            raise OptionError("channel_search", self.channel_search,
                              f"a per-channel weight search, one of {', '.join(CHANNEL_SEARCHES)}")
        if self.input_grid not in INPUT_GRIDS:
            raise OptionError("input_grid", self.input_grid, f"an input grid, one of {', '.join(INPUT_GRIDS)}")
        mp = self.mixed_precision
        if mp is not None and not 4 <= mp <= 8:
            raise OptionError("mixed_precision", mp,
                              "a mixed precision target: an integer average bit width 4..8, e.g. 6 or 8")
        if not self.low < self.high:
            raise OptionError("high", self.high, f"a number above low = {self.low} (0 < low < high)")

