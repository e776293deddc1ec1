"""The noise schedule, prediction type and default sampler between our configs and a diffusers
scheduler_config.json.

Import keeps what defines the model (betas, T, zero-terminal SNR, prediction type) and the spacing
settings (timestep_spacing, steps_offset, Karras sigmas); the scheduler class picks the default sampler
where latentdiff has the same algorithm, else DPM++ 2M. Export writes the diffusers scheduler that runs
our default sampler with our spacing. Deliberate difference: our DDIM always ends at σ = 0; diffusers'
DDIM with set_alpha_to_one=false (SD's setting) stops one step short, at ᾱ_0 (σ ≈ 0.03 for SD), so
export writes set_alpha_to_one=true. diffusers' LCMScheduler takes its steps from a 50-step grid (4 steps:
t = 999, 759, 499, 259), where our lcm sampler takes them from the spacing (trailing: 999, 749, 499, 249).
"""
from __future__ import annotations

import copy

from ..diffusion.schedules import ScheduleConfig
from ..errors import CheckpointError
from ..samplers import SamplingConfig
from .mapping import check_fixed

SAMPLER_SCHEDULERS = {  # our sampler -> the diffusers scheduler that runs the same algorithm
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler", "lcm": "LCMScheduler"}
FALLBACK_SAMPLER = "dpmpp_2m"
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# diffusers' default timestep_spacing per scheduler class, for configs that do not name one
_LEADING_BY_DEFAULT = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DDIMParallelScheduler", "LCMScheduler")
# diffusers' default beta settings, for configs that do not name them
_DIFFUSERS_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
# DPM-Solver variants other than the multistep 2nd-order DPM-Solver++ that our dpmpp_2m is
_DPM_FIXED = {"algorithm_type": "dpmsolver++", "solver_order": 2}
# UniPC variants other than the 2nd-order, data-prediction, B(h) = e^h - 1 one with every corrector that our unipc is
_UNIPC_FIXED = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                "disable_corrector": []}
# diffusers' karras option; our karras spacing does not take a timestep spacing
DIFFUSERS_KARRAS_SPACING = "linspace"
SD_GUIDANCE_SCALE = 7.5      # StableDiffusionPipeline's defaults, which come with an imported pipeline
SD_STEPS = 50


def schedule_from_diffusers(config: dict, where: str) -> tuple[ScheduleConfig, str, SamplingConfig]:
    """(ScheduleConfig, prediction, SamplingConfig) of a diffusers scheduler config."""
    if config.get("trained_betas") is not None:
        raise CheckpointError(f"{where}: explicit trained_betas are not supported (only the named beta schedules)")
    values = {**_DIFFUSERS_BETAS, **{k: config[k] for k in _DIFFUSERS_BETAS if k in config}}
    kinds = {theirs: ours for ours, theirs in BETA_SCHEDULES.items()}
    if values["beta_schedule"] not in kinds:
        raise CheckpointError(f"{where}: beta_schedule {values['beta_schedule']!r} is not one of {', '.join(kinds)}")
    predictions = {theirs: ours for ours, theirs in PREDICTION_TYPES.items()}
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in predictions:
        raise CheckpointError(f"{where}: prediction_type {prediction_type!r} is not one of {', '.join(predictions)}")
    schedule = ScheduleConfig(kind=kinds[values["beta_schedule"]], num_train_timesteps=values["num_train_timesteps"],
                              beta_start=float(values["beta_start"]), beta_end=float(values["beta_end"]),
                              zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)))

    class_name = config.get("_class_name", "")
    samplers = {theirs: ours for ours, theirs in SAMPLER_SCHEDULERS.items()}
    sampler = samplers.get(class_name, FALLBACK_SAMPLER)
    if sampler == "dpmpp_2m" and class_name:
        check_fixed(config, _DPM_FIXED, where)
    if sampler == "unipc":
        check_fixed(config, _UNIPC_FIXED, where)
    spacing = config.get("timestep_spacing", "leading" if class_name in _LEADING_BY_DEFAULT else "linspace")
    if config.get("use_karras_sigmas"):
        spacing = "karras"
    if spacing not in ("leading", "trailing", "linspace", "karras"):
        raise CheckpointError(f"{where}: timestep_spacing {spacing!r} is not supported")
    sampling = SamplingConfig(sampler=sampler, steps=SD_STEPS, guidance_scale=SD_GUIDANCE_SCALE, spacing=spacing,
                              steps_offset=int(config.get("steps_offset", 0)))
    return schedule, predictions[prediction_type], sampling


def schedule_to_diffusers(schedule: ScheduleConfig, prediction: str, sampling: SamplingConfig) -> dict:
    """The scheduler_config.json of the diffusers scheduler that runs our default sampler on our schedule."""
    config = {
        "_class_name": SAMPLER_SCHEDULERS[sampling.sampler],
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": BETA_SCHEDULES[schedule.kind],
        "trained_betas": None,
        "prediction_type": PREDICTION_TYPES[prediction],
        "rescale_betas_zero_snr": schedule.zero_terminal_snr,
        "timestep_spacing": DIFFUSERS_KARRAS_SPACING if sampling.spacing == "karras" else sampling.spacing,
        "steps_offset": sampling.steps_offset,
    }
    if sampling.spacing == "karras":
        config["use_karras_sigmas"] = True
    # latents are not pixels: never clip or threshold the predicted x0 (see diffusion/denoiser.py)
    if sampling.sampler in ("ddim", "ddpm", "lcm"):
        config.update(clip_sample=False, thresholding=False)
    if sampling.sampler == "ddim":
        config["set_alpha_to_one"] = True
    if sampling.sampler == "ddpm":
        config["variance_type"] = "fixed_small"
    # the fields an import checks (_DPM_FIXED, _UNIPC_FIXED) come from the same tables, so the two cannot drift
    if sampling.sampler == "dpmpp_2m":
        config.update(copy.deepcopy(_DPM_FIXED), solver_type="midpoint", lower_order_final=True,
                      final_sigmas_type="zero", thresholding=False)
    if sampling.sampler == "unipc":
        config.update(copy.deepcopy(_UNIPC_FIXED), final_sigmas_type="zero", thresholding=False)
    return config
