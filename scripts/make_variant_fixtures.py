#!/usr/bin/env python3
"""Build the parity fixtures of pipelines that differ from make_fixtures.py's `sd_tiny` by their
UNet (models/fixtures/lcm_tiny, inpaint_tiny), or add a network to it (controlnet_tiny). Each folder holds sd_tiny's text encoder, tokenizer
and VAE as symbolic links to its folders, so nothing is stored twice.

`lcm_tiny` is a tiny LatentConsistencyModelPipeline folder: a UNet of sd_tiny's shape with
`time_cond_proj_dim` (the guidance-scale code LCM-distilled UNets are conditioned on,
`time_embedding.cond_proj`), and diffusers' LCMScheduler as LCM checkpoints ship it. Beside them:

* `unet/io.safetensors`: the UNet's output on two samples with guidance-scale codes (diffusers'
  `get_guidance_scale_embedding` of two scales), and its gradients w.r.t. the sample and the code;
* `io.safetensors`, `io.json`: a reference run of LatentConsistencyModelPipeline (prompt -> CLIP
  -> 4 LCM steps with the guidance-scale code of 8.5 -> VAE) from fixed latents, its step noise
  drawn from a seeded generator and recorded.

`inpaint_tiny` is a tiny StableDiffusionInpaintPipeline folder: a UNet of sd_tiny's shape with 9
input channels (the latent, the mask, the masked image's latents) and sd_tiny's DDIM scheduler.
Beside them, `io.safetensors` and `io.json`: a 16x16 image and mask (also as PNGs), the mask at the
latent's size and the masked image's latents (the VAE's posterior mean, which the run is given),
and a reference run (prompt -> CLIP -> 4 DDIM steps with guidance 3 -> VAE) from fixed latents.

`sdxl_inpaint_tiny` is the same for StableDiffusionXLInpaintPipeline: sdxl_tiny's two text encoders,
tokenizers and VAE linked, its UNet's config with 9 input channels, its Euler scheduler, no
aesthetic score; `io.safetensors`: a reference run at strength 1 (its default, 0.9999, would skip
the first step) from fixed latents, with inpaint_tiny's image and mask.

`sd_tiny_lora` holds a LoRA of sd_tiny's UNet (attention, feed-forward, resnet convolutions and
time projections), rank 2, made with peft: `pytorch_lora_weights.safetensors` as diffusers'
`save_lora_weights` writes it (peft keys, alpha = rank), and `kohya.safetensors` the same matrices
plus a LoRA of the text encoder's q, v and fc1 in kohya's layout with `.alpha` 4 (twice the rank's
scale). `io.safetensors`: the prompt embeddings and the final latents of sd_tiny's reference run (4
DDIM steps, guidance 3) with each fused (diffusers' `load_lora_weights` + `fuse_lora`, lora_scale
0.8 for the first; the kohya file's as lora_scale 2, its text encoder's part by hand), and with
`with_metadata.safetensors` (the UNet's matrices, lora_alpha 4 in the file's adapter metadata) at 0.5.

`controlnet_tiny` is a tiny StableDiffusionControlNetPipeline folder: sd_tiny's UNet, text encoder,
tokenizer and VAE linked, its DDIM scheduler, and a random ControlNetModel of the UNet's input path
whose conditioning embedding halves once (16x16 control images for 8x8 latents).
`controlnet/io.safetensors`: the ControlNet's residuals at conditioning scale 0.7 with their
gradients w.r.t. the latent and the control image, and sd_tiny's UNet given them; `io.safetensors`:
`control.png` as the pipeline reads it and a reference run (4 DDIM steps, guidance 3, control scale
0.8) from fixed latents; `multi.safetensors`: the same run with the ControlNet twice
(MultiControlNetModel) on `control.png` and `control2.png` at scales 0.8 and 0.5.

`sdxl_controlnet_tiny` is the same for StableDiffusionXLControlNetPipeline: sdxl_tiny's parts linked, its
Euler scheduler, a random ControlNet of its UNet's input path (with the added conditions' embedding);
`io.safetensors`: a reference run (4 steps, guidance 3, control scale 0.8, controlnet_tiny's image).

`sd_tiny_embeddings` holds textual-inversion embeddings in diffusers' layout (and pickled as
`learned_embeds.bin`), A1111's (`emb_params`, three vectors) and SDXL's (`clip_l`, `clip_g`), with
the token ids and prompt embeddings diffusers' `load_textual_inversion` gives on sd_tiny and
sdxl_tiny.

`wide.safetensors` in sd_tiny and sdxl_tiny (made by make_fixtures.py and make_sdxl_fixtures.py,
read back here): the latents and final latents of each pipeline's reference run at 16x24 pixels
(height x width; SDXL's size numbers follow), 4 steps with guidance 3.

Run make_fixtures.py first (it writes sd_tiny). Regenerate with the environment it names:

    /tmp/fx/bin/python scripts/make_variant_fixtures.py
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


SD_DIR = os.path.join(ROOT, "sd_tiny")


def sd_tiny_parts():
    """sd_tiny's text encoder, tokenizer and VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(os.path.join(SD_DIR, "text_encoder")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(SD_DIR, "tokenizer"))
    vae = AutoencoderKL.from_pretrained(os.path.join(SD_DIR, "vae")).eval()
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)


def variant_unet(seed, **changes):
    """A randomised UNet of sd_tiny's config with `changes`, its output at a trained one's scale."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = UNet2DConditionModel.load_config(os.path.join(SD_DIR, "unet"))
    unet = UNet2DConditionModel.from_config(dict(config, **changes)).eval()
    randomize_(unet, seed)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    return unet


def save_variant(pipe, out_dir, base="sd_tiny",
                 components=("text_encoder", "tokenizer", "vae")) -> None:
    """Saves `pipe` with `base`'s components replaced by links to them."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for component in components:
        shutil.rmtree(os.path.join(out_dir, component))
        os.symlink(os.path.join("..", base, component), os.path.join(out_dir, component))


def write_run(out_dir, tensors, meta) -> None:
    """A reference run's tensors (`io.safetensors`) and settings (`io.json`)."""
    save_io(os.path.join(out_dir, "io.safetensors"), tensors)
    with open(os.path.join(out_dir, "io.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("wrote", os.path.abspath(out_dir))


def lcm_fixture() -> None:
    import diffusers.schedulers.scheduling_lcm as lcm_module
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    out_dir = os.path.join(ROOT, "lcm_tiny")
    unet = variant_unet(SEED + 70, time_cond_proj_dim=TIME_COND_DIM)
    with torch.no_grad():
        # Keep the code's share of the time embedding at the sinusoidal code's scale.
        unet.time_embedding.cond_proj.weight.mul_(0.25)
    # SimianLuo/LCM_Dreamshaper_v7's scheduler config.
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                             original_inference_steps=50, timestep_scaling=10.0, prediction_type="epsilon")
    pipe = LatentConsistencyModelPipeline(unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False, **sd_tiny_parts())
    save_variant(pipe, out_dir)
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
    write_run(out_dir, dict(latents=latents, noise=noise, final_latents=results["latent"], image=results["pt"],
                            prompt_embeds=embeds, timestep_cond=code),
              dict(prompt=prompt, steps=steps, guidance=guidance, timesteps=pipe.scheduler.timesteps.tolist()))


def inpaint_fixture() -> None:
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
    from PIL import Image

    out_dir = os.path.join(ROOT, "inpaint_tiny")
    unet = variant_unet(SEED + 80, in_channels=9)
    scheduler = DDIMScheduler.from_pretrained(os.path.join(SD_DIR, "scheduler"))
    pipe = StableDiffusionInpaintPipeline(unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False, **sd_tiny_parts())
    save_variant(pipe, out_dir)

    g = torch.Generator().manual_seed(SEED + 180)
    size = 16
    pixels = (torch.rand(size, size, 3, generator=g) * 255).round().to(torch.uint8)
    mask_pixels = torch.zeros(size, size, dtype=torch.uint8)
    mask_pixels[3:11, 5:14] = 255
    image_png, mask_png = os.path.join(out_dir, "image.png"), os.path.join(out_dir, "mask.png")
    Image.fromarray(pixels.numpy(), "RGB").save(image_png)
    Image.fromarray(mask_pixels.numpy(), "L").save(mask_png)
    image_pil, mask_pil = Image.open(image_png), Image.open(mask_png)
    # As the pipeline prepares them, its generator's posterior sample replaced by the mean.
    image = pipe.image_processor.preprocess(image_pil, height=size, width=size)
    mask = pipe.mask_processor.preprocess(mask_pil, height=size, width=size)
    with torch.no_grad():
        masked_latents = pipe.vae.config.scaling_factor * pipe.vae.encode(image * (mask < 0.5)).latent_dist.mode()
    latent_mask = torch.nn.functional.interpolate(mask, size=(size // pipe.vae_scale_factor,) * 2)

    prompt, steps, guidance = "a photo of the cat", 4, 3.0
    latents = torch.randn(1, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor, generator=g)
    run = dict(image=image_pil, mask_image=mask_pil, masked_image_latents=masked_latents, num_inference_steps=steps,
               guidance_scale=guidance, height=size, width=size)
    with torch.no_grad():
        final = pipe(prompt, latents=latents.clone(), output_type="latent", **run).images
        decoded = pipe(prompt, latents=latents.clone(), output_type="pt", **run).images
    write_run(out_dir, dict(image=image, mask=mask, latent_mask=latent_mask, masked_image_latents=masked_latents,
                            latents=latents, final_latents=final, decoded=decoded),
              dict(prompt=prompt, steps=steps, guidance=guidance, timesteps=pipe.scheduler.timesteps.tolist()))


def sdxl_inpaint_fixture() -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = os.path.join(ROOT, "sdxl_tiny")
    out_dir = os.path.join(ROOT, "sdxl_inpaint_tiny")
    torch.manual_seed(SEED + 85)
    config = UNet2DConditionModel.load_config(os.path.join(base, "unet"))
    unet = UNet2DConditionModel.from_config(dict(config, in_channels=9)).eval()
    randomize_(unet, SEED + 85)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    pipe = StableDiffusionXLInpaintPipeline(
        unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(os.path.join(base, "scheduler")),
        vae=AutoencoderKL.from_pretrained(os.path.join(base, "vae")).eval(),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder")).eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(os.path.join(base, "text_encoder_2")).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer_2")),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    save_variant(pipe, out_dir, "sdxl_tiny", ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"))

    size = 16
    inpaint_dir = os.path.join(ROOT, "inpaint_tiny")
    image_pil = Image.open(os.path.join(inpaint_dir, "image.png"))
    mask_pil = Image.open(os.path.join(inpaint_dir, "mask.png"))
    image = pipe.image_processor.preprocess(image_pil, height=size, width=size)
    mask = pipe.mask_processor.preprocess(mask_pil, height=size, width=size)
    with torch.no_grad():
        masked_latents = pipe.vae.config.scaling_factor * pipe.vae.encode(image * (mask < 0.5)).latent_dist.mode()
    prompt, steps, guidance = "a photo of the cat", 4, 3.0
    f = pipe.vae_scale_factor
    latents = torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(SEED + 185))
    with torch.no_grad():
        final = pipe(prompt, image=image_pil, mask_image=mask_pil, masked_image_latents=masked_latents,
                     num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, strength=1.0,
                     latents=latents.clone(), output_type="latent").images
    write_run(out_dir, dict(latents=latents, final_latents=final, masked_image_latents=masked_latents),
              dict(prompt=prompt, steps=steps, guidance=guidance, timesteps=pipe.scheduler.timesteps.tolist()))


def lora_fixture() -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = os.path.join(ROOT, "sd_tiny_lora")
    os.makedirs(out_dir, exist_ok=True)
    load = lambda: StableDiffusionPipeline.from_pretrained(SD_DIR, safety_checker=None)
    pipe = load()
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "time_emb_proj", "conv_shortcut"]
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=unet_targets))
    g = torch.Generator().manual_seed(SEED + 190)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    unet_layers = get_peft_model_state_dict(pipe.unet)
    # The same matrices saved with their adapter config (lora_alpha 4, twice the rank), which
    # diffusers writes into the file's metadata and reads back.
    config = pipe.unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=unet_layers, safe_serialization=True,
                                              weight_name="with_metadata.safetensors",
                                              unet_lora_adapter_metadata=dict(config, lora_alpha=4))
    # (diffusers writes target_modules, a set, in no fixed order: the file's bytes vary, its values not.)
    # The text encoder's by hand: transformers 5 wants a newer peft than PyPI has to adapt it, so
    # its LoRA goes into the kohya file only and its reference is fused by hand, W += s (α/r) B A.
    te_layers = {}
    for name, module in pipe.text_encoder.named_modules():
        if name.endswith(("q_proj", "v_proj", "fc1")):
            path = name if name.startswith("text_model.") else "text_model." + name
            te_layers[path + ".lora_A.weight"] = 0.2 * torch.randn(2, module.in_features, generator=g)
            te_layers[path + ".lora_B.weight"] = 0.2 * torch.randn(module.out_features, 2, generator=g)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=unet_layers, safe_serialization=True)
    kohya = {}
    for prefix, layers in (("lora_unet_", unet_layers), ("lora_te_", te_layers)):
        for key, value in layers.items():
            for peft_suffix, kohya_suffix in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
                if key.endswith(peft_suffix):
                    name = prefix + key[: -len(peft_suffix)].replace(".", "_")
                    kohya[name + kohya_suffix] = value.contiguous()
                    kohya[name + ".alpha"] = torch.tensor(4.0)
    save_file(kohya, os.path.join(out_dir, "kohya.safetensors"))

    prompt, steps, guidance = "a photo of the cat", 4, 3.0
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED + 140))
    io = {}
    # kohya's alpha 4 over rank 2 doubles the matrices' product: diffusers' lora_scale 2.
    for name, scale, file in (("peft", 0.8, "pytorch_lora_weights"), ("kohya", 2.0, "pytorch_lora_weights"),
                              ("metadata", 0.5, "with_metadata")):
        pipe = load()
        pipe.load_lora_weights(out_dir, weight_name=file + ".safetensors")
        pipe.fuse_lora(lora_scale=scale)
        if name == "kohya":
            with torch.no_grad():
                for key, a in te_layers.items():
                    if key.endswith(".lora_A.weight"):
                        path = key[: -len(".lora_A.weight")]
                        try:
                            module = pipe.text_encoder.get_submodule(path)
                        except AttributeError:
                            module = pipe.text_encoder.get_submodule(path[len("text_model."):])
                        b = te_layers[path + ".lora_B.weight"]
                        module.weight.add_(scale * b @ a)
        with torch.no_grad():
            io[f"prompt_embeds_{name}"] = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            io[f"final_latents_{name}"] = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                                               latents=latents.clone(), output_type="latent").images
    write_run(out_dir, dict(io, latents=latents),
              dict(prompt=prompt, steps=steps, guidance=guidance, scales=dict(peft=0.8, kohya=1.0, metadata=0.5)))


# The UNet config keys a ControlNet copies (its input path's).
CONTROLNET_KEYS = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
                   "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
                   "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
                   "transformer_layers_per_block", "attention_head_dim", "use_linear_projection",
                   "resnet_time_scale_shift")


def controlnet_fixture() -> None:
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, UNet2DConditionModel
    from PIL import Image

    out_dir = os.path.join(ROOT, "controlnet_tiny")
    config = UNet2DConditionModel.load_config(os.path.join(SD_DIR, "unet"))
    keep = CONTROLNET_KEYS
    torch.manual_seed(SEED + 95)
    # The conditioning embedding halves once: sd_tiny's VAE makes 8x8 latents of 16x16 images.
    controlnet = ControlNetModel(**{k: config[k] for k in keep}, conditioning_embedding_out_channels=(8, 16)).eval()
    randomize_(controlnet, SEED + 95)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(SD_DIR, "unet")).eval()
    scheduler = DDIMScheduler.from_pretrained(os.path.join(SD_DIR, "scheduler"))
    pipe = StableDiffusionControlNetPipeline(unet=unet, controlnet=controlnet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False, **sd_tiny_parts())
    save_variant(pipe, out_dir, components=("text_encoder", "tokenizer", "vae", "unet"))

    # The ControlNet alone, and sd_tiny's UNet given its residuals.
    g = torch.Generator().manual_seed(SEED + 195)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timestep = torch.tensor([19.0, 759.0])
    ctx = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    cond = torch.rand(2, 3, 16, 16, generator=g)
    scale = 0.7

    def residuals(x, c):
        down, mid = controlnet(x, timestep, ctx, c, conditioning_scale=scale, return_dict=False)
        return list(down) + [mid]

    x, c = sample.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    outs = residuals(x, c)
    ws = [torch.randn(o.shape, generator=g) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, ws)).backward()
    with torch.no_grad():
        outs = [o.detach() for o in outs]
        unet_out = unet(sample, timestep, ctx, down_block_additional_residuals=outs[:-1],
                        mid_block_additional_residual=outs[-1]).sample
    tensors = dict(sample=sample, timestep=timestep, encoder_hidden_states=ctx, controlnet_cond=cond,
                   grad_sample=x.grad, grad_controlnet_cond=c.grad, unet_out=unet_out)
    for i, (o, w) in enumerate(zip(outs, ws)):
        name = "mid" if i == len(outs) - 1 else f"down_{i}"
        tensors[name], tensors[f"w_{name}"] = o, w
    save_io(os.path.join(out_dir, "controlnet", "io.safetensors"), dict(tensors, conditioning_scale=torch.tensor([scale])))

    # The whole pipeline on a control image.
    size = 16
    pixels = (torch.rand(size, size, 3, generator=g) * 255).round().to(torch.uint8)
    control_png = os.path.join(out_dir, "control.png")
    Image.fromarray(pixels.numpy(), "RGB").save(control_png)
    control_pil = Image.open(control_png)
    image = pipe.control_image_processor.preprocess(control_pil, height=size, width=size)
    prompt, steps, guidance, control_scale = "a photo of the cat", 4, 3.0, 0.8
    latents = torch.randn(1, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor, generator=g)
    run = dict(image=control_pil, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
               controlnet_conditioning_scale=control_scale)
    with torch.no_grad():
        final = pipe(prompt, latents=latents.clone(), output_type="latent", **run).images
        decoded = pipe(prompt, latents=latents.clone(), output_type="pt", **run).images
        plain = pipe(prompt, latents=latents.clone(), output_type="latent", **dict(run, controlnet_conditioning_scale=0.0)).images
    assert (final - plain).abs().max() > 1e-2, "the ControlNet must change the run"
    write_run(out_dir, dict(control_image=image, latents=latents, final_latents=final, decoded=decoded),
              dict(prompt=prompt, steps=steps, guidance=guidance, control_scale=control_scale,
                   timesteps=pipe.scheduler.timesteps.tolist()))

    # Two ControlNets (diffusers' MultiControlNetModel; the same one twice) on two images.
    pixels = (torch.rand(size, size, 3, generator=g) * 255).round().to(torch.uint8)
    second_png = os.path.join(out_dir, "control2.png")
    Image.fromarray(pixels.numpy(), "RGB").save(second_png)
    multi = StableDiffusionControlNetPipeline(**dict(pipe.components, controlnet=[controlnet, controlnet]))
    with torch.no_grad():
        final = multi(prompt, latents=latents.clone(), output_type="latent",
                      **dict(run, image=[control_pil, Image.open(second_png)],
                             controlnet_conditioning_scale=[0.8, 0.5])).images
    save_io(os.path.join(out_dir, "multi.safetensors"), dict(final_latents=final))


def sdxl_controlnet_fixture() -> None:
    from diffusers import (AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline,
                           UNet2DConditionModel)
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = os.path.join(ROOT, "sdxl_tiny")
    out_dir = os.path.join(ROOT, "sdxl_controlnet_tiny")
    config = UNet2DConditionModel.load_config(os.path.join(base, "unet"))
    keep = CONTROLNET_KEYS + ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
    torch.manual_seed(SEED + 96)
    controlnet = ControlNetModel(**{k: config[k] for k in keep}, conditioning_embedding_out_channels=(8, 16)).eval()
    randomize_(controlnet, SEED + 96)
    pipe = StableDiffusionXLControlNetPipeline(
        unet=UNet2DConditionModel.from_pretrained(os.path.join(base, "unet")).eval(), controlnet=controlnet,
        scheduler=EulerDiscreteScheduler.from_pretrained(os.path.join(base, "scheduler")),
        vae=AutoencoderKL.from_pretrained(os.path.join(base, "vae")).eval(),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder")).eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(os.path.join(base, "text_encoder_2")).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer_2")),
        force_zeros_for_empty_prompt=True)
    save_variant(pipe, out_dir, "sdxl_tiny",
                 ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"))

    size = 16
    control_pil = Image.open(os.path.join(ROOT, "controlnet_tiny", "control.png"))
    prompt, steps, guidance, control_scale = "a photo of the cat", 4, 3.0, 0.8
    f = pipe.vae_scale_factor
    latents = torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(SEED + 196))
    run = dict(image=control_pil, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
               controlnet_conditioning_scale=control_scale, output_type="latent")
    with torch.no_grad():
        final = pipe(prompt, latents=latents.clone(), **run).images
        plain = pipe(prompt, latents=latents.clone(), **dict(run, controlnet_conditioning_scale=0.0)).images
    assert (final - plain).abs().max() > 1e-2, "the ControlNet must change the run"
    write_run(out_dir, dict(latents=latents, final_latents=final),
              dict(prompt=prompt, steps=steps, guidance=guidance, control_scale=control_scale,
                   timesteps=pipe.scheduler.timesteps.tolist()))


def textual_inversion_fixture() -> None:
    """sd_tiny_embeddings: two textual-inversion embeddings of sd_tiny's text encoder, loaded by
    diffusers' load_textual_inversion, and the prompt embeddings they give."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    out_dir = os.path.join(ROOT, "sd_tiny_embeddings")
    os.makedirs(out_dir, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(SD_DIR, safety_checker=None)
    g = torch.Generator().manual_seed(SEED + 210)
    width = pipe.text_encoder.config.hidden_size
    # diffusers' format (its textual_inversion script: {token: [vectors, width]}), one vector,
    # and A1111's safetensors format ({"emb_params": ...}, the token is the file's name), three.
    single = os.path.join(out_dir, "cat-toy.safetensors")
    cat_toy = 0.5 * torch.randn(1, width, generator=g)
    save_file({"<cat-toy>": cat_toy}, single)
    torch.save({"<cat-toy>": cat_toy}, os.path.join(out_dir, "cat-toy.bin"))  # learned_embeds.bin
    multi = os.path.join(out_dir, "bad-hands.safetensors")
    save_file({"emb_params": 0.5 * torch.randn(3, width, generator=g)}, multi)
    pipe.load_textual_inversion(single)
    pipe.load_textual_inversion(multi, token="bad-hands")
    prompt, negative = "a photo of <cat-toy> next to the bad-hands cat", "bad-hands"
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(converted, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds, negative_embeds = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    save_io(os.path.join(out_dir, "io.safetensors"),
            dict(input_ids=ids, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds))
    with open(os.path.join(out_dir, "io.json"), "w") as f:
        json.dump(dict(prompt=prompt, negative_prompt=negative, converted=converted,
                       added_tokens={t: i for t, i in pipe.tokenizer.get_added_vocab().items() if i >= 531}), f, indent=1)
    print("wrote", out_dir, converted)

    # SDXL's layout: a table per text encoder, loaded into each with its tokenizer (as diffusers'
    # docs load such files).
    from diffusers import StableDiffusionXLPipeline

    xl = StableDiffusionXLPipeline.from_pretrained(os.path.join(ROOT, "sdxl_tiny"))
    widths = [xl.text_encoder.config.hidden_size, xl.text_encoder_2.config.hidden_size]
    tables = {name: 0.5 * torch.randn(2, w, generator=g) for name, w in zip(("clip_l", "clip_g"), widths)}
    xl_path = os.path.join(out_dir, "xl-style.safetensors")
    save_file(tables, xl_path)
    xl.load_textual_inversion(tables["clip_l"], token="xl-style", text_encoder=xl.text_encoder, tokenizer=xl.tokenizer)
    xl.load_textual_inversion(tables["clip_g"], token="xl-style", text_encoder=xl.text_encoder_2,
                              tokenizer=xl.tokenizer_2)
    xl_prompt = "a xl-style photo of the cat"
    with torch.no_grad():
        embeds, _, pooled, _ = xl.encode_prompt(xl_prompt, device="cpu", do_classifier_free_guidance=False)
    save_io(os.path.join(out_dir, "xl.safetensors"), dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled))
    print("wrote xl.safetensors:", xl_prompt)


def wide_fixtures() -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for folder, cls in (("sd_tiny", StableDiffusionPipeline), ("sdxl_tiny", StableDiffusionXLPipeline)):
        kwargs = dict(safety_checker=None) if cls is StableDiffusionPipeline else {}
        pipe = cls.from_pretrained(os.path.join(ROOT, folder), **kwargs)
        height, width = 16, 24
        f = pipe.vae_scale_factor
        latents = torch.randn(1, 4, height // f, width // f, generator=torch.Generator().manual_seed(SEED + 200))
        with torch.no_grad():
            final = pipe("a photo of the cat", num_inference_steps=4, guidance_scale=3.0, height=height, width=width,
                         latents=latents.clone(), output_type="latent").images
        save_io(os.path.join(ROOT, folder, "wide.safetensors"), dict(latents=latents, final_latents=final))
        print("wrote", os.path.join(folder, "wide.safetensors"))


def main() -> None:
    lcm_fixture()
    inpaint_fixture()
    lora_fixture()
    wide_fixtures()
    sdxl_inpaint_fixture()
    controlnet_fixture()
    sdxl_controlnet_fixture()
    textual_inversion_fixture()


if __name__ == "__main__":
    main()
