#!/usr/bin/env python3
"""Reference trajectories of diffusers' DDIM, DPM-Solver++(2M, 3M, 2M SDE, 3M SDE), UniPC (bh2, bh1; order 2, 3),
Euler, Heun, LMS, PNDM (PLMS), LCM, TCD, DEIS, KDPM2 and KDPM2 ancestral schedulers for the diffusion tests (tests/fixtures/samplers.safetensors +
samplers.json).

The noise prediction is a fixed function, eps(x, t) = x @ A.T + c * (t / 1000), with A and c
seeded random; x_T is seeded random of shape (2, 4), and so is x_0, which the img2img cases
(`strength` < 1) noise to their first kept timestep. For each scheduler configuration we record
the timesteps and the sample after every step. Euler and Heun (k-diffusion's samplers) step the
variance-exploding sample x/alpha and feed the network its scaled input, as their pipelines do;
their trajectories are recorded as x = alpha * sample after every whole step (Heun's two
calls), like the others. CI never runs this script; regenerate with

    python3 -m venv /tmp/fxenv && /tmp/fxenv/bin/pip install torch diffusers safetensors scipy  # scipy: LMS
    /tmp/fxenv/bin/python scripts/make_sampler_fixtures.py
"""

import json
import os

import diffusers
import numpy as np
import torch
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_ancestral_module
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler,
                       UniPCMultistepScheduler)
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
torch.manual_seed(7)
A = (torch.randn(4, 4, dtype=torch.float64) * 0.3)
c = torch.randn(4, dtype=torch.float64) * 0.5
x_T = torch.randn(2, 4, dtype=torch.float64)
x_0 = torch.randn(2, 4, dtype=torch.float64)  # the clean sample of the img2img cases


def eps(x, t):
    return x @ A.T + c * (float(t) / 1000.0)


# DDIM with "trailing" spacing uses 8 steps, a divisor of 1000: diffusers' DDIMScheduler.step goes
# from t to t - 1000 // steps, which is the next timestep only when the steps divide 1000 (for
# other counts it steps to a noise level the next step does not start from).
CASES = {
    "ddim_sd": (DDIMScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                     timestep_spacing="leading"), 10),
    "ddim_linear_trailing": (DDIMScheduler, dict(beta_schedule="linear", clip_sample=False,
                                                  set_alpha_to_one=True, timestep_spacing="trailing"), 8),
    "dpmpp2m_sd": (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012), 10),
    "dpmpp2m_linear_leading": (DPMSolverMultistepScheduler, dict(beta_schedule="linear", timestep_spacing="leading",
                                                                  steps_offset=1), 20),
    # "DPM++ 2M Karras": fewer than 15 steps (the last one first order) and more.
    "dpmpp2m_sd_karras": (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                            beta_end=0.012, use_karras_sigmas=True), 10),
    "dpmpp2m_linear_karras": (DPMSolverMultistepScheduler, dict(beta_schedule="linear", use_karras_sigmas=True), 25),
    # img2img (`strength`): x_0 noised to the first kept timestep, then the last steps.
    "ddim_sd_img2img": (DDIMScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                             timestep_spacing="leading"), 10),
    "dpmpp2m_sd_karras_img2img": (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear",
                                                                    beta_start=0.00085, beta_end=0.012,
                                                                    use_karras_sigmas=True), 20),
    # 12 of 20 steps ending on sigma_min: diffusers' last step is second order (it counts all 20).
    "dpmpp2m_sd_img2img_sigma_min": (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear",
                                                                       beta_start=0.00085, beta_end=0.012,
                                                                       final_sigmas_type="sigma_min"), 20),
    # DPM-Solver++(3M): fewer than 15 steps (lower order at the last two), more, Karras, img2img.
    "dpmpp3m_sd": (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012, solver_order=3), 10),
    "dpmpp3m_sd_20": (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012, solver_order=3), 20),
    "dpmpp3m_linear_karras": (DPMSolverMultistepScheduler, dict(beta_schedule="linear", use_karras_sigmas=True,
                                                                solver_order=3), 25),
    "dpmpp3m_sd_img2img_sigma_min": (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear",
                                                                       beta_start=0.00085, beta_end=0.012,
                                                                       final_sigmas_type="sigma_min",
                                                                       solver_order=3), 20),
    # UniPC (bh2, order 2, corrector on): under and over 15 steps, Karras, img2img.
    "unipc_sd": (UniPCMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                               beta_end=0.012), 10),
    "unipc_linear_20": (UniPCMultistepScheduler, dict(beta_schedule="linear"), 20),
    "unipc_sd_karras": (UniPCMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012, use_karras_sigmas=True), 12),
    "unipc_sd_img2img": (UniPCMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                       beta_end=0.012), 20),
    # UniPC bh1 (B(h) = -h): under 10 steps, as the paper recommends it, and 20. Both end on sigma_min:
    # ending on 0, diffusers 0.42.1's bh1 returns NaN at the last step (its first-order predictor adds
    # alpha_t * B_h * 0 with B_h = -h = -inf), where the method's value is the data prediction.
    "unipc_bh1_sd_8": (UniPCMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012, solver_type="bh1",
                                                     final_sigmas_type="sigma_min"), 8),
    "unipc_bh1_linear_20": (UniPCMultistepScheduler, dict(beta_schedule="linear", solver_type="bh1",
                                                          final_sigmas_type="sigma_min"), 20),
    # UniPC of order 3 (solver_order=3): SD 10 steps, linear 20, bh1 on sigma_min, Karras, img2img.
    "unipc3_sd": (UniPCMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                beta_end=0.012, solver_order=3), 10),
    "unipc3_linear_20": (UniPCMultistepScheduler, dict(beta_schedule="linear", solver_order=3), 20),
    "unipc3_bh1_sd_8": (UniPCMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012, solver_type="bh1", solver_order=3,
                                                      final_sigmas_type="sigma_min"), 8),
    "unipc3_sd_karras": (UniPCMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                       beta_end=0.012, solver_order=3, use_karras_sigmas=True), 12),
    "unipc3_sd_img2img": (UniPCMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012, solver_order=3), 20),
}
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# Cases whose noise levels come from float64 alphas_cumprod (diffusers keeps them in float32, which
# moves levels by ~1e-6): every case added with Euler, Heun and the exponential levels.
F64_CASES = {
    # Exponential (log-sigma) and Lu (lambda) levels of the multistep schedulers: the same levels,
    # timesteps truncated (exponential) or rounded (Lu) to integers.
    "dpmpp2m_sd_exponential": (DPMSolverMultistepScheduler, dict(SD, use_exponential_sigmas=True), 12),
    "dpmpp2m_sd_lu": (DPMSolverMultistepScheduler, dict(SD, use_lu_lambdas=True), 12),
    "unipc_linear_exponential": (UniPCMultistepScheduler, dict(beta_schedule="linear", use_exponential_sigmas=True), 15),
    # EulerDiscreteScheduler: "linspace" on whole timesteps (10) and fractional ones (20), SDXL's
    # "leading" with steps_offset 1, Karras (on the spaced levels, fractional timesteps), exponential,
    # ending on sigma_min, img2img.
    "euler_sd_10": (EulerDiscreteScheduler, SD, 10),
    "euler_sd_20": (EulerDiscreteScheduler, SD, 20),
    "euler_linear_leading": (EulerDiscreteScheduler, dict(beta_schedule="linear", timestep_spacing="leading",
                                                          steps_offset=1), 25),
    "euler_sd_karras": (EulerDiscreteScheduler, dict(SD, use_karras_sigmas=True), 15),
    "euler_sd_leading_karras": (EulerDiscreteScheduler, dict(SD, timestep_spacing="leading", steps_offset=1,
                                                             use_karras_sigmas=True), 12),
    "euler_sd_exponential": (EulerDiscreteScheduler, dict(SD, use_exponential_sigmas=True), 12),
    # Ending on sigma_min after "leading" timesteps (the last is 1). On "linspace" the last timestep is 0
    # and diffusers' last step goes from sigma_min to sigma_min: a network call that moves nothing.
    "euler_sd_sigma_min": (EulerDiscreteScheduler, dict(SD, timestep_spacing="leading", steps_offset=1,
                                                        final_sigmas_type="sigma_min"), 14),
    "euler_sd_img2img": (EulerDiscreteScheduler, SD, 20),
    # HeunDiscreteScheduler: the last step (to sigma = 0) is Euler.
    "heun_sd_10": (HeunDiscreteScheduler, SD, 10),
    "heun_linear_15": (HeunDiscreteScheduler, dict(beta_schedule="linear"), 15),
    "heun_sd_trailing_8": (HeunDiscreteScheduler, dict(SD, timestep_spacing="trailing"), 8),
    "heun_sd_karras": (HeunDiscreteScheduler, dict(SD, use_karras_sigmas=True), 12),
    "heun_sd_img2img": (HeunDiscreteScheduler, SD, 20),
    # Zero terminal SNR (rescale_betas_zero_snr, the last alphas_cumprod set to 2**-24) with "trailing"
    # timesteps, which start sampling at that level.
    "euler_sd_zsnr_trailing": (EulerDiscreteScheduler, dict(SD, rescale_betas_zero_snr=True,
                                                            timestep_spacing="trailing"), 10),
    "dpmpp2m_sd_zsnr_trailing": (DPMSolverMultistepScheduler, dict(SD, rescale_betas_zero_snr=True,
                                                                   timestep_spacing="trailing"), 12),
}
# Stochastic samplers: DDIM with eta and DPM-Solver++(2M) SDE (their variance_noise given) and Euler
# ancestral (eta None: its randn_tensor replaced by the same seeded draws). `<name>_noise` holds the
# standard normal tensor of each step.
NOISY_CASES = {
    "ddim_sd_eta1": (DDIMScheduler, dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 10, 1.0),
    "ddim_linear_trailing_eta05": (DDIMScheduler, dict(beta_schedule="linear", clip_sample=False,
                                                       set_alpha_to_one=True, timestep_spacing="trailing"), 8, 0.5),
    "euler_ancestral_sd": (EulerAncestralDiscreteScheduler, SD, 12, None),
    # DPM-Solver++(2M) SDE ("DPM++ 2M SDE", and its Karras levels over 20 steps), variance_noise given.
    "dpmpp2m_sde_sd": (DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++"), 10, 0.0),
    "dpmpp2m_sde_sd_karras": (DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++",
                                                                use_karras_sigmas=True), 20, 0.0),
    "euler_ancestral_linear_leading": (EulerAncestralDiscreteScheduler, dict(beta_schedule="linear",
                                                                             timestep_spacing="leading",
                                                                             steps_offset=1), 10, None),
    # DPM-Solver++(3M) SDE ("DPM++ 3M SDE"): under 15 steps (the last two of lower order), 20 steps
    # on Karras' levels.
    "dpmpp3m_sde_sd": (DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3),
                       10, 0.0),
    "dpmpp3m_sde_sd_karras": (DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3,
                                                                use_karras_sigmas=True), 20, 0.0),
    # "DPM++ 2M SDE" with solver_type="heun".
    "dpmpp2m_sde_sd_heun": (DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++",
                                                              solver_type="heun"), 10, 0.0),
}
STRENGTH = {"euler_sd_img2img": 0.6, "heun_sd_img2img": 0.55, "unipc3_sd_img2img": 0.6, "unipc_sd_img2img": 0.6, "ddim_sd_img2img": 0.6, "dpmpp2m_sd_karras_img2img": 0.55, "dpmpp2m_sd_img2img_sigma_min": 0.6,
            "dpmpp3m_sd_img2img_sigma_min": 0.6}



def karras_sigmas_f64(config, steps):
    """The Karras levels of `use_karras_sigmas` computed from float64 betas. diffusers keeps
    alphas_cumprod in float32, which moves its levels by ~1e-6 (relative) and the samples by
    3.4e-6 (scaled_linear, 10 steps) and 3.2e-5 (linear, 25 steps) from the float64 algorithm;
    adjoint-dpm computes in float64, so the fixture does too, to test the algorithm to 1e-6."""
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    if config["beta_schedule"] == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, 1000) ** 2
    else:
        betas = np.linspace(start, end, 1000)
    abar = np.cumprod(1.0 - betas)
    sigmas = ((1.0 - abar) / abar) ** 0.5
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigmas[0] ** (1 / 7), sigmas[-1] ** (1 / 7)
    return np.concatenate([(hi + ramp * (lo - hi)) ** 7, [0.0]])


tensors = {"A": A, "c": c, "x_T": x_T, "x_0": x_0}
meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "cases": {}}
def abar_f64(config):
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    if config["beta_schedule"] == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, 1000) ** 2
    else:
        betas = np.linspace(start, end, 1000)
    abar = np.cumprod(1.0 - betas)
    if config.get("rescale_betas_zero_snr"):
        # diffusers' rescale_zero_terminal_snr, in float64, then its 2**-24 floor.
        root = np.sqrt(abar)
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        abar = root ** 2
        abar[-1] = 2.0 ** -24
    return torch.from_numpy(abar)


def k_diffusion_run(name, sched, steps):
    """Euler or Heun as their pipelines run them: the sample is x / alpha, the network sees
    scale_model_input's x. Returns x = alpha * sample at each level, and the levels' timesteps."""
    timesteps, begin = sched.timesteps, 0
    sigma = lambda i: float(sched.sigmas[i])
    to_x = lambda sample, i: sample / (sigma(i) ** 2 + 1) ** 0.5
    if name in STRENGTH:
        kept = min(int(steps * STRENGTH[name]), steps)
        begin = max(steps - kept, 0) * sched.order
        timesteps = timesteps[begin:]
        sched.set_begin_index(begin)
        sample = sched.add_noise(x_0, x_T, timesteps[:1])
    else:
        sample = x_T * (sigma(0) ** 2 + 1) ** 0.5
    trajectory = [to_x(sample, begin)]
    for k, t in enumerate(timesteps):
        x_in = sched.scale_model_input(sample, t)
        sample = sched.step(eps(x_in, t), t, sample).prev_sample
        whole = getattr(sched, "state_in_first_order", True) or k == len(timesteps) - 1
        if whole:
            trajectory.append(to_x(sample, sched.step_index))
    return torch.stack(trajectory), [float(t) for t in timesteps[::sched.order]]


def plms_run(sched):
    """PNDM with skip_prk_steps: one call more than steps (its first step is a trapezoid through
    a provisional DDIM step, whose sample is not a step's); returns the samples after whole steps
    and the timesteps they start from."""
    timesteps = sched.timesteps
    x, trajectory = x_T.clone(), [x_T.clone()]
    for k, t in enumerate(timesteps):
        x = sched.step(eps(x, t), t, x).prev_sample
        if k != 0 or len(timesteps) == 1:
            trajectory.append(x.clone())
    whole = [t for k, t in enumerate(timesteps) if k != 1 or len(timesteps) == 1]
    return torch.stack(trajectory), [float(t) for t in whole]


# PLMS as Stable Diffusion 1.x ships it (10 steps), and on the linear schedule over 20 steps with
# set_alpha_to_one (its last step to alpha = 1) and no offset.
PLMS_CASES = {
    "plms_sd": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                    set_alpha_to_one=False, steps_offset=1),
    "plms_linear_20": dict(beta_schedule="linear", skip_prk_steps=True, set_alpha_to_one=True),
}
PLMS_STEPS = {"plms_sd": 10, "plms_linear_20": 20}

# DPM-Solver++ with solver_type="heun" (its second-order update): 2M under 15 steps, 3M over 15;
# LMS (k-diffusion's sampler, run like Euler) on SD's schedule and the linear one.
CASES.update({
    "lms_sd": (LMSDiscreteScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 10),
    "lms_linear_20": (LMSDiscreteScheduler, dict(beta_schedule="linear"), 20),
    "dpmpp2m_sd_heun": (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012, solver_type="heun"), 10),
    "dpmpp3m_sd_heun_20": (DPMSolverMultistepScheduler, dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                             beta_end=0.012, solver_order=3, solver_type="heun"), 20),
})

for name, (cls, config, steps) in {**CASES, **F64_CASES}.items():
    sched = cls(num_train_timesteps=1000, **config)
    if name in F64_CASES:
        sched.alphas_cumprod = abar_f64(config)
    sched.set_timesteps(steps)
    if cls in (EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler):
        tensors[name], ts = k_diffusion_run(name, sched, steps)
        meta["cases"][name] = {"scheduler": cls.__name__, "config": config, "steps": steps,
                               "strength": STRENGTH.get(name, 1.0), "timesteps": ts}
        continue
    if config.get("use_karras_sigmas"):
        sched.sigmas = torch.from_numpy(karras_sigmas_f64(config, steps))
    timesteps = sched.timesteps
    x = x_T.clone()
    if name in STRENGTH:
        # As diffusers' StableDiffusionImg2ImgPipeline.get_timesteps and prepare_latents.
        kept = min(int(steps * STRENGTH[name]), steps)
        t_start = max(steps - kept, 0)
        timesteps = timesteps[t_start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start)
        x = sched.add_noise(x_0, x_T, timesteps[:1])
    trajectory = [x.clone()]
    for t in timesteps:
        x = sched.step(eps(x, t), t, x).prev_sample
        trajectory.append(x.clone())
    tensors[name] = torch.stack(trajectory)
    meta["cases"][name] = {"scheduler": cls.__name__, "config": config, "steps": steps,
                           "strength": STRENGTH.get(name, 1.0), "timesteps": [float(t) for t in timesteps]}

for name, config in PLMS_CASES.items():
    sched = PNDMScheduler(num_train_timesteps=1000, **config)
    sched.set_timesteps(PLMS_STEPS[name])
    tensors[name], ts = plms_run(sched)
    meta["cases"][name] = {"scheduler": "PNDMScheduler", "config": config, "steps": PLMS_STEPS[name],
                           "strength": 1.0, "timesteps": ts}

noise_gen = torch.Generator().manual_seed(11)
for name, (cls, config, steps, eta) in NOISY_CASES.items():
    sched = cls(num_train_timesteps=1000, **config)
    if cls is EulerAncestralDiscreteScheduler:
        sched.alphas_cumprod = abar_f64(config)
    sched.set_timesteps(steps)
    if config.get("use_karras_sigmas"):
        sched.sigmas = torch.from_numpy(karras_sigmas_f64(config, steps))
    noise = torch.randn(steps, 2, 4, dtype=torch.float64, generator=noise_gen)
    tensors[name + "_noise"] = noise
    if eta is not None:
        x, trajectory = x_T.clone(), [x_T.clone()]
        for k, t in enumerate(sched.timesteps):
            extra = dict(eta=eta) if cls is DDIMScheduler else {}
            x = sched.step(eps(x, t), t, x, variance_noise=noise[k], **extra).prev_sample
            trajectory.append(x.clone())
        tensors[name] = torch.stack(trajectory)
        ts = [float(t) for t in sched.timesteps]
    else:
        draws = iter(noise)
        euler_ancestral_module.randn_tensor = lambda *args, **kwargs: next(draws)
        tensors[name], ts = k_diffusion_run(name, sched, steps)
    meta["cases"][name] = {"scheduler": cls.__name__, "config": config, "steps": steps, "eta": eta,
                           "strength": 1.0, "timesteps": ts}

# LCMScheduler (multistep latent consistency sampling): its timesteps picked from those it was
# distilled on (original_inference_steps 50, and 100 on the linear schedule), one step, and img2img
# as LatentConsistencyModelImg2ImgPipeline runs it (strength shrinks the distillation timesteps in
# set_timesteps, then get_timesteps keeps the last steps). Its randn_tensor is replaced by seeded
# draws, recorded as `<name>_noise` (none for the last step, none at all for one step).
import diffusers.schedulers.scheduling_lcm as lcm_module
from diffusers import LCMScheduler

LCM_SD = dict(SD, set_alpha_to_one=True, steps_offset=1)
LCM_CASES = {
    "lcm_sd_4": (LCM_SD, 4, 1.0),
    "lcm_sd_1": (LCM_SD, 1, 1.0),
    "lcm_linear_8_orig100": (dict(beta_schedule="linear", original_inference_steps=100), 8, 1.0),
    "lcm_sd_img2img": (LCM_SD, 6, 0.5),
}
# TCDScheduler (strategic stochastic sampling) on LCM's timesteps: gamma (its step's `eta`) 0.3 as its
# pipelines default, 0 (deterministic, no draws), 0.7 on the linear schedule, and img2img.
import diffusers.schedulers.scheduling_tcd as tcd_module
from diffusers import TCDScheduler

TCD_CASES = {
    "tcd_sd_4": (LCM_SD, 4, 1.0, 0.3),
    "tcd_sd_8_gamma0": (LCM_SD, 8, 1.0, 0.0),
    "tcd_linear_6_gamma07": (dict(beta_schedule="linear"), 6, 1.0, 0.7),
    "tcd_sd_img2img": (LCM_SD, 6, 0.5, 0.3),
}


def img2img_tail(sched, steps, strength):
    """The timesteps an img2img pipeline runs and where it starts (x_0 noised to the first, with
    x_T as the noise), as `get_timesteps` and `prepare_latents` do; the whole run for strength 1."""
    if strength >= 1:
        return sched.timesteps, x_T.clone()
    kept = min(int(steps * strength), steps)
    t_start = max(steps - kept, 0)
    timesteps = sched.timesteps[t_start:]
    sched.set_begin_index(t_start)
    return timesteps, sched.add_noise(x_0, x_T, timesteps[:1])


# One noise tensor per step but the last (none for TCD's gamma 0), drawn from each sampler's own
# generator in place of its module's randn_tensor.
for cls, module, cases, seed in ((LCMScheduler, lcm_module, LCM_CASES, 13), (TCDScheduler, tcd_module, TCD_CASES, 17)):
    gen = torch.Generator().manual_seed(seed)
    for name, (config, steps, strength, *gamma) in cases.items():
        sched = cls(num_train_timesteps=1000, **config)
        sched.alphas_cumprod = abar_f64(config)
        sched.set_timesteps(steps, strength=strength)
        timesteps, x = img2img_tail(sched, steps, strength)
        extra = dict(eta=gamma[0]) if gamma else {}
        draws_needed = len(timesteps) - 1 if not gamma or gamma[0] > 0 else 0
        noise = torch.randn(draws_needed, 2, 4, dtype=torch.float64, generator=gen)
        draws = iter(noise)
        module.randn_tensor = lambda *args, **kwargs: next(draws)
        trajectory = [x.clone()]
        for t in timesteps:
            x = sched.step(eps(x, t), t, x, **extra).prev_sample
            trajectory.append(x.clone())
        assert next(draws, None) is None
        tensors[name] = torch.stack(trajectory)
        if len(noise):
            tensors[name + "_noise"] = noise
        meta["cases"][name] = {"scheduler": cls.__name__, "config": config, "steps": steps, "strength": strength,
                               **({"eta": gamma[0]} if gamma else {}), "timesteps": [float(t) for t in timesteps]}

# DEISMultistepScheduler ("logrho"): order 2 (its default) under 15 steps, order 3 under and over 15
# steps, order 2 img2img. diffusers keeps its sigmas in float32, which moves the log-rho coefficients by
# ~1e-7 relative; they are replaced by float64 ones here (the levels at the same integer timesteps,
# then the smallest level, as set_timesteps appends it), to test the algorithm to 1e-6.
from diffusers import DEISMultistepScheduler

DEIS_CASES = {
    "deis_sd_10": (dict(SD), 10, 2, 1.0),
    "deis3_sd_10": (dict(SD), 10, 3, 1.0),
    "deis3_linear_20": (dict(beta_schedule="linear"), 20, 3, 1.0),
    "deis_sd_img2img": (dict(SD), 20, 2, 0.6),
}
for name, (config, steps, order, strength) in DEIS_CASES.items():
    sched = DEISMultistepScheduler(num_train_timesteps=1000, solver_order=order, **config)
    sched.set_timesteps(steps)
    abar = abar_f64(config)
    sig = ((1 - abar) / abar).sqrt()
    sched.sigmas = torch.cat([sig[sched.timesteps], sig[:1]])
    timesteps, x = img2img_tail(sched, steps, strength)
    trajectory = [x.clone()]
    for t in timesteps:
        x = sched.step(eps(x, t), t, x).prev_sample
        trajectory.append(x.clone())
    tensors[name] = torch.stack(trajectory)
    meta["cases"][name] = {"scheduler": "DEISMultistepScheduler", "config": dict(config, solver_order=order),
                           "steps": steps, "strength": strength, "timesteps": [float(t) for t in timesteps]}

# KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler ("DPM2", "DPM2 a"), run as their pipelines
# run k-diffusion's samplers (k_diffusion_run: two calls per step but the last); Karras' levels, whose
# timesteps these schedulers round; the ancestral one's randn_tensor replaced by seeded draws.
import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as kdpm2_a_module
from diffusers import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler

DPM2_CASES = {
    "kdpm2_sd_10": (KDPM2DiscreteScheduler, dict(SD), 10),
    "kdpm2_linear_15": (KDPM2DiscreteScheduler, dict(beta_schedule="linear"), 15),
    "kdpm2_sd_karras_12": (KDPM2DiscreteScheduler, dict(SD, use_karras_sigmas=True), 12),
    "kdpm2_a_sd_10": (KDPM2AncestralDiscreteScheduler, dict(SD), 10),
    "kdpm2_a_sd_karras_12": (KDPM2AncestralDiscreteScheduler, dict(SD, use_karras_sigmas=True), 12),
}
dpm2_gen = torch.Generator().manual_seed(19)
for name, (cls, config, steps) in DPM2_CASES.items():
    sched = cls(num_train_timesteps=1000, **config)
    sched.alphas_cumprod = abar_f64(config)
    sched.set_timesteps(steps)
    ancestral = cls is KDPM2AncestralDiscreteScheduler
    noise = torch.randn(steps - 1 if ancestral else 0, 2, 4, dtype=torch.float64, generator=dpm2_gen)
    draws = iter(noise)
    kdpm2_a_module.randn_tensor = lambda *args, **kwargs: next(draws)
    tensors[name], ts = k_diffusion_run(name, sched, steps)
    assert next(draws, None) is None
    if len(noise):
        tensors[name + "_noise"] = noise
    meta["cases"][name] = {"scheduler": cls.__name__, "config": config, "steps": steps, "strength": 1.0,
                           "timesteps": ts}

# Classifier-free guidance with guidance_rescale (diffusers' rescale_noise_cfg): the network's two
# outputs, read as eps ("cfg_rescaled") and as v, converted to eps = alpha v + sigma x at t = 500 of
# SD's schedule ("cfg_rescaled_v_eps").
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

cfg_gen = torch.Generator().manual_seed(5)
cfg_x, out_u = torch.randn(2, 4, dtype=torch.float64, generator=cfg_gen), torch.randn(2, 4, dtype=torch.float64, generator=cfg_gen)
out_c = 1.5 * torch.randn(2, 4, dtype=torch.float64, generator=cfg_gen)
CFG = {"scale": 7.5, "phi": 0.7, "t": 500}
guided = out_u + CFG["scale"] * (out_c - out_u)
abar_t = abar_f64(SD)[CFG["t"]]
tensors.update({"cfg_x": cfg_x, "cfg_uncond": out_u, "cfg_cond": out_c,
                "cfg_rescaled": rescale_noise_cfg(guided, out_c, CFG["phi"]),
                "cfg_rescaled_v_eps": abar_t.sqrt() * rescale_noise_cfg(guided, out_c, CFG["phi"])
                + (1 - abar_t).sqrt() * cfg_x})
meta["cfg"] = CFG

os.makedirs(OUT, exist_ok=True)
save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "samplers.safetensors"))
with open(os.path.join(OUT, "samplers.json"), "w") as f:
    json.dump(meta, f, indent=1)
print(json.dumps(meta["cases"], indent=1))
