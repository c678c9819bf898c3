#!/usr/bin/env python3
"""Build the latent consistency model (LCM) parity fixture of adjoint-dpm (models/fixtures/lcm_tiny).

`lcm_tiny` is a tiny LatentConsistencyModelPipeline folder: make_fixtures.py's `sd_tiny` text
encoder, tokenizer and VAE (symbolic links to its folders, so nothing is stored twice), a UNet of
sd_tiny's shape with `time_cond_proj_dim` (the guidance-scale code LCM-distilled UNets are
conditioned on, `time_embedding.cond_proj`), and diffusers' LCMScheduler as LCM checkpoints ship
it. Beside them:

* `unet/io.safetensors`: the UNet's output on two samples with guidance-scale codes (diffusers'
  `get_guidance_scale_embedding` of two scales), and its gradients w.r.t. the sample and the code;
* `io.safetensors`, `io.json`: a reference run of LatentConsistencyModelPipeline (prompt -> CLIP
  -> 4 LCM steps with the guidance-scale code of 8.5 -> VAE) from fixed latents, its step noise
  drawn from a seeded generator and recorded.

Run make_fixtures.py first (it writes sd_tiny). Regenerate with the environment it names:

    /tmp/fx/bin/python scripts/make_lcm_fixtures.py
"""

import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import ROOT, SEED, grad_of, randomize_, save_io  # noqa: E402

TIME_COND_DIM = 16


def unet_io(pipe, out_dir) -> None:
    """Inputs, output and gradients (w.r.t. the sample and the guidance-scale code) of the UNet."""
    unet = pipe.unet
    g = torch.Generator().manual_seed(SEED + 170)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timestep = torch.tensor([19.0, 759.0])
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    scales = torch.tensor([8.5, 2.0])
    code = pipe.get_guidance_scale_embedding(scales - 1, embedding_dim=TIME_COND_DIM)

    def fn(x, cond=code):
        return unet(x, timestep, ctx, timestep_cond=cond).sample

    out, w, grad = grad_of(fn, sample, SEED + 270)
    cond = code.clone().requires_grad_(True)
    (fn(sample, cond) * w).sum().backward()
    save_io(os.path.join(out_dir, "io.safetensors"),
            dict(sample=sample, timestep=timestep, encoder_hidden_states=ctx, guidance_scales=scales,
                 timestep_cond=code, out=out, w=w, grad_sample=grad, grad_timestep_cond=cond.grad))


def main() -> None:
    import diffusers.schedulers.scheduling_lcm as lcm_module
    from diffusers import (AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    sd_dir, out_dir = os.path.join(ROOT, "sd_tiny"), os.path.join(ROOT, "lcm_tiny")
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(sd_dir, "text_encoder")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(sd_dir, "tokenizer"))
    vae = AutoencoderKL.from_pretrained(os.path.join(sd_dir, "vae")).eval()
    torch.manual_seed(SEED + 70)
    config = UNet2DConditionModel.load_config(os.path.join(sd_dir, "unet"))
    unet = UNet2DConditionModel.from_config(dict(config, time_cond_proj_dim=TIME_COND_DIM)).eval()
    randomize_(unet, SEED + 70)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
        # Keep the code's share of the time embedding at the sinusoidal code's scale.
        unet.time_embedding.cond_proj.weight.mul_(0.25)
    # SimianLuo/LCM_Dreamshaper_v7's scheduler config.
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                             original_inference_steps=50, timestep_scaling=10.0, prediction_type="epsilon")
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # sd_tiny's components, linked rather than copied.
    for component in ("text_encoder", "tokenizer", "vae"):
        shutil.rmtree(os.path.join(out_dir, component))
        os.symlink(os.path.join("..", "sd_tiny", component), os.path.join(out_dir, component))
    unet_io(pipe, os.path.join(out_dir, "unet"))

    prompt, steps, guidance = "a photo of the cat", 4, 8.5
    g = torch.Generator().manual_seed(SEED + 171)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(steps - 1, 1, 4, 8, 8, generator=g)
    run = dict(num_inference_steps=steps, guidance_scale=guidance)
    results = {}
    with torch.no_grad():
        for output_type in ("latent", "pt"):
            draws = iter(noise)
            lcm_module.randn_tensor = lambda *args, **kwargs: next(draws)
            results[output_type] = pipe(prompt, latents=latents.clone(), output_type=output_type, **run).images
            assert next(draws, None) is None, "the pipeline drew a noise tensor per step but the last"
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        code = pipe.get_guidance_scale_embedding(torch.tensor([guidance - 1]), embedding_dim=TIME_COND_DIM)
    save_io(os.path.join(out_dir, "io.safetensors"),
            dict(latents=latents, noise=noise, final_latents=results["latent"], image=results["pt"],
                 prompt_embeds=embeds, timestep_cond=code))
    with open(os.path.join(out_dir, "io.json"), "w") as f:
        json.dump(dict(prompt=prompt, steps=steps, guidance=guidance, timesteps=pipe.scheduler.timesteps.tolist()),
                  f, indent=1)
    print("wrote", os.path.abspath(out_dir))


if __name__ == "__main__":
    main()
