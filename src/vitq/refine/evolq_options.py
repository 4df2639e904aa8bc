"""The options of the Evol-Q refiner (:class:`EvolQOptions`) and its four modes' presets; see
:mod:`vitq.refine.evolq` for what each mode does."""

from __future__ import annotations

from dataclasses import dataclass

from vitq.options import OptionError, Options, opt
from vitq.refine.fitness import LOSSES

RELEASE_GROUPS = ("attn", "mlp", "act")  # the release's scale groups (searched as a vector of scales)
DISCRETE_GROUPS = ("logq", "heads", "ptf", "wscale_pre")  # the knob search (vitq.refine.evolq_discrete)
GROUPS = RELEASE_GROUPS + DISCRETE_GROUPS
TEACHERS = ("float", "int_layernorm")
MUTATIONS = ("absolute", "relative")
RELATIVE_RADIUS = 0.02  # r of relative mutation when none is given

# what each mode sets before the options given (a user option always wins)
PRESETS: dict[str, dict] = {
    "checked": {},
    "faithful": {"check_fraction": 0.0},
    "improved": {"children": 4, "search": ("attn", "mlp", "act"), "mutation": "relative",
                 "radius": RELATIVE_RADIUS, "patience": 2},
    # the knobs gradients and reconstruction cannot reach, scored by KL to the float logits over every search
    # image; one short pass (evaluations = blocks x (1 + cycles x children))
    "discrete": {"search": DISCRETE_GROUPS, "loss": "kl", "check_loss": "kl", "mutation": "relative",
                 "radius": RELATIVE_RADIUS, "passes": 1, "cycles": 2, "children": 4, "population": 8,
                 "sample": 3, "patience": 1},
}


@dataclass(frozen=True)
class EvolQOptions(Options):
    mode: str = opt("checked", "checked = the release's search scored on a search part of the calibration images, "
                    "a block's new scales kept only if the held-out check part does not get worse; faithful = "
                    "the official release (no check part); improved = relative mutation, MLP and activation "
                    "scales, 4 children per generation, early stop, check part; discrete = the knobs gradients "
                    "cannot reach "
                    "(log bases and top levels, per-head gains, PTF shifts, weight scales re-rounding the "
                    "continuous weights; --evolq-search logq,heads,ptf,wscale_pre), KL fitness and KL check, "
                    "relative radius 0.02, 1 pass of 2 generations x 4 children, population 8, tournaments of 3",
                    choices=tuple(PRESETS))
    passes: int = opt(10, "passes over all blocks (P)", minimum=1, metavar="P")
    cycles: int = opt(3, "generations per block (K)", minimum=1, metavar="K")
    population: int = opt(15, "population size", minimum=2, metavar="N")
    sample: int = opt(10, "members drawn (with replacement) per tournament; the best is the parent", minimum=1,
                      metavar="N")
    children: int = opt(1, "children per generation, each from its own tournament (faithful/checked 1, "
                        "improved 4)", minimum=1, metavar="N")
    loss: str = opt("infonce", "fitness (kl, mse, cosine: mean over every search image; infonce: mean over "
                    "batches as the release; discrete: kl)", choices=tuple(sorted(LOSSES)))
    temperature: float = opt(3.0, "infoNCE temperature", above=0.0, metavar="T")
    search: tuple[str, ...] = opt(("attn",), "comma-separated subset of attn (qkv+proj weight scales), mlp "
                                  "(fc1+fc2), act (the block's activation scales), and the knob groups: logq (log "
                                  "quantizers' base and top level, discrete steps), heads (q/k/v scale per head, "
                                  "steps of 2^(1/8)), ptf (PTF per-channel shifts, +-1), wscale_pre (weight scales, "
                                  "relative radius, the weights rounded again from their continuous values: "
                                  "recon's start, GPTQ's compensated weights or the float weights); "
                                  "faithful/checked attn, improved attn,mlp,act, discrete logq,heads,ptf,wscale_pre",
                                  choices=GROUPS, metavar="GROUPS")
    mutation: str = opt("absolute", "absolute U(-r,r) (faithful/checked) or relative U(-r,r)*|s| (improved, "
                        "discrete)", choices=MUTATIONS)
    radius: float | None = opt(None, "mutation radius r (faithful/checked: 1e-4 for 8-bit weights, 1e-3 "
                               "otherwise, as the release; relative mutation (improved, discrete): 0.02)",
                               above=0.0, metavar="R")
    patience: int | None = opt(None, "stop after N passes that improve the fitness less than "
                               "--evolq-min-improvement (faithful/checked: never; improved: 2; discrete: 1; 0 = "
                               "never)",
                               minimum=0, metavar="N")
    min_improvement: float = opt(1e-4, "relative fitness improvement per pass that counts as progress",
                                 minimum=0.0, metavar="F")
    select_on_val: bool = opt(False, "REPRODUCTION ONLY, as the release: after every block measure top-1 on the "
                              "--val images; every block of pass 0 is saved unconditionally, later blocks only "
                              "when top-1 beats the saved state, and the saved state is the result (selects on "
                              "evaluation labels; recorded in results.json)")
    batch_size: int = opt(100, "images per fitness batch, independent of --batch-size (the release's; infoNCE "
                          "negatives = N - 1)", minimum=2, metavar="N")
    check_fraction: float = opt(0.2, "share of the calibration images held out (seeded) as the check part "
                                "(checked, improved, discrete 0.2; faithful 0 = no check: the fitness then uses "
                                "every calibration image)", minimum=0.0, below=1.0, metavar="F")
    check_loss: str | None = opt(None, "fitness on the check part (default: the search's --evolq-loss)",
                                 choices=tuple(sorted(LOSSES)))
    teacher: str = opt("float", "targets: float, or int_layernorm = the release's, through its integer LayerNorm "
                       "(the calibrated model with only its LayerNorm-input/PTF quantizers on)", choices=TEACHERS)
    seed: int | None = opt(None, "seed of the search; none = the calibration seed (--seed)", metavar="N")
    checkpoint_path: str | None = opt(None, "resume file written after every block (default OUT.evolq-ckpt beside "
                                      "--out); a rerun of the same command continues from it; removed after "
                                      "success", metavar="FILE")

    @classmethod
    def preset(cls, given: dict) -> dict:
        """The mode's preset under the options given; relative mutation without a radius gets 0.02."""
        mode = given.get("mode", "checked")
        values = {**PRESETS.get(mode, {}), **given}
        if values.get("mutation") == "relative" and values.get("radius") is None:
            values["radius"] = RELATIVE_RADIUS
        return values

    def check(self) -> None:
        if self.children >= self.population:
            raise OptionError("children", self.children, "an integer >= 1 and smaller than the population")
        if not self.search or len(set(self.search)) != len(self.search):
            raise OptionError("search", ",".join(self.search), f"a comma-separated subset of {', '.join(GROUPS)}")
        if "wscale_pre" in self.search and {"attn", "mlp"} & set(self.search):
            raise OptionError("search", ",".join(self.search), "wscale_pre without attn/mlp (all three search the "
                              "same weight scales; wscale_pre also re-rounds the continuous weights)")


def make_config(options: dict | None = None) -> EvolQOptions:
    """The checked options of one search (the mode's preset, then the options given); a bad one is refused
    naming its flag."""
    return EvolQOptions.build(options, "evolq")


def default_radius(bits: int) -> float:
    """Absolute mutation radius of the release: 1e-4 for 8-bit weights (and wider), 1e-3 for every other width
    (the release tests ``bits == 8``; 5-7-bit weights get 1e-3 as there)."""
    return 1e-4 if bits >= 8 else 1e-3
