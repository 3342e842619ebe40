"""Which sampling step a model evaluation in ComfyUI starts, from the sigmas alone.

Every ComfyUI sampler (``ddim`` is Euler, ``uni_pc`` converts its own time variable back) calls
the model with a noise level ``sigma``; the schedule it runs is ``sample_sigmas`` (``n + 1``
values for ``n`` steps, the last 0 or the end of a partial schedule). The first evaluation of
step ``i`` is at ``sigmas[i]`` on the sampler's own latent; evaluations at other noise levels
(DPM2's and DPM++ 2S/SDE's midpoints) are a step's later evaluations of temporary latents.

Some samplers also evaluate temporaries AT schedule levels before the step there starts: Heun
evaluates ``x + d dt`` at ``sigmas[i + 1]``, Heun++ (``heunpp2``) at ``sigmas[i + 1]`` and
``sigmas[i + 2]`` (``comfy/k_diffusion/sampling.py``), and DPM2 ancestral and DPM++ 2S ancestral
at their midpoint ``sqrt(sigma_i * sigma_down)``, which at ``eta`` = 1 (their default) is exactly
``sigma_(i+1)``, since then ``sigma_down = sigma_(i+1)^2 / sigma_i`` (found in the evaluations
recorded from ComfyUI, ``tests/fixtures/comfy_recorded.json``). For them the first evaluation of
step ``i`` is the one after those temporaries; ``temporaries_before`` counts them. The latent is updated
only at a step's first evaluation, as in the WebUI, because only that tensor is the one the
sampler continues from.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence

# The sampler functions (``KSAMPLER.sampler_function.__name__``) whose later evaluations land on
# schedule levels.
HEUN = "sample_heun"
HEUN_PLUS_PLUS = "sample_heunpp2"
MIDPOINT_AT_NEXT_LEVEL = ("sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral")  # when eta == 1


def schedule_index(sigmas: Sequence[float], sigma: float) -> Optional[int]:
    """The step ``i`` with ``sigmas[i] == sigma`` (relative tolerance 1e-4, the float32 round trip
    of a sampler's own time variable), or None; the final level starts no step."""
    for index, level in enumerate(sigmas[:-1]):
        if math.isclose(float(level), float(sigma), rel_tol=1e-4, abs_tol=1e-7):
            return index
    return None


def temporaries_before(sampler: str, sigmas: Sequence[float], index: int, eta: float = 1.0) -> int:
    """How many evaluations of earlier steps' temporaries come at ``sigmas[index]`` before the
    first evaluation of step ``index`` (see the module doc); ``eta``: the sampler's option."""
    end = float(sigmas[-1])
    if sampler == HEUN or (sampler in MIDPOINT_AT_NEXT_LEVEL and eta == 1.0):
        # Step i - 1 takes an Euler step (no temporary) only when its next level is 0.
        return int(index >= 1 and float(sigmas[index]) != 0)
    if sampler == HEUN_PLUS_PLUS:
        # Step j evaluates at sigmas[j + 1] unless that is the end, and also at sigmas[j + 2]
        # unless either is the end.
        from_previous = index >= 1 and float(sigmas[index]) != end
        from_two_back = index >= 2 and float(sigmas[index - 1]) != end and float(sigmas[index]) != end
        return int(from_previous) + int(from_two_back)
    return 0


class StepCounter:
    """Counts one sampling run's evaluations at each schedule level and says which evaluation
    starts a step: ``first_evaluation(sigma)`` is the step index there, else None."""

    def __init__(self, sampler: str, sigmas: Sequence[float], eta: float = 1.0):
        self.sampler = sampler
        self.eta = eta
        self.sigmas = [float(level) for level in sigmas]
        self._seen: Counter[int] = Counter()

    @property
    def total_steps(self) -> int:
        return len(self.sigmas) - 1

    def first_evaluation(self, sigma: float) -> Optional[int]:
        index = schedule_index(self.sigmas, sigma)
        if index is None:
            return None
        self._seen[index] += 1
        return index if self._seen[index] == temporaries_before(self.sampler, self.sigmas, index, self.eta) + 1 else None
