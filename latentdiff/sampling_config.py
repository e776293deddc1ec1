"""SamplingConfig: a pipeline's default sampling settings, and the check of a sampler's name, importable
without torch (the samplers are in samplers.py) so that a request can be refused before any model loads."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from .config import check_choice
from .diffusion.schedule_config import SPACINGS
from .errors import ConfigError

SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "unipc", "lcm")  # SAMPLERS' keys, in its order


def sampler_names() -> tuple[str, ...]:
    """The known samplers: samplers.SAMPLERS' keys once samplers.py is loaded (a sampler added there counts),
    else SAMPLER_NAMES (samplers.py checks at import that the two agree)."""
    samplers = sys.modules.get(f"{__package__}.samplers")
    return tuple(getattr(samplers, "SAMPLERS", SAMPLER_NAMES))


def check_sampler(name: str, where: str = "sampler") -> None:
    """ConfigError unless `name` is a known sampler (read at call time: a sampler added later counts)."""
    known = sampler_names()
    if name not in known:
        raise ConfigError(f"{where}: unknown sampler {name!r} (known: {', '.join(known)})")


@dataclass(frozen=True)
class SamplingConfig:
    sampler: str = "dpmpp_2m"         # a name in samplers.SAMPLERS
    steps: int = 20                   # denoising steps
    guidance_scale: float = 3.0       # classifier-free guidance scale (1 = no guidance)
    spacing: str = "leading"          # sigma spacing: "leading", "trailing", "linspace" or "karras"
    steps_offset: int = 1             # added to "leading" timesteps (SD: 1; diffusers' scheduler field of that name)

    def __post_init__(self):
        check_sampler(self.sampler, "sampling.sampler")
        check_choice("sampling.spacing", self.spacing, SPACINGS)
        if self.steps < 1:
            raise ConfigError(f"sampling.steps: must be at least 1, got {self.steps}")
        if self.steps_offset < 0:
            raise ConfigError(f"sampling.steps_offset: must be at least 0, got {self.steps_offset}")
        if self.guidance_scale < 0:
            raise ConfigError(f"sampling.guidance_scale: must be at least 0, got {self.guidance_scale}")
