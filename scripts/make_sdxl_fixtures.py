#!/usr/bin/env python3
"""Build the SDXL parity fixtures of `adjoint-dpm-models` (models/fixtures/).

`sdxl_tiny` is a whole tiny StableDiffusionXLPipeline folder: two tokenizers and text
encoders, the Euler scheduler as SDXL ships it, zeros for the empty negative prompt, and a
reference run (`io.safetensors`, `io.json`). Beside two components, the inputs and outputs of
what SDXL adds to SD 1.x/2.x:

* `unet/io.safetensors`: the UNet with `addition_embed_type = "text_time"` (the pooled text
  embedding and six size/crop numbers join the time embedding), with its input and
  pooled-embedding gradients;
* `text_encoder_2/io.safetensors`: transformers' `CLIPTextModelWithProjection` (exact GELU,
  the legacy end-token rule, a projected pooled output) with its penultimate hidden state,
  which SDXL conditions on.

Also `clip_skip.safetensors` in `sdxl_tiny` and in make_fixtures.py's `sd_tiny`: the prompt
embeddings both pipelines compute with `clip_skip = 1`.

It reuses the helpers of make_fixtures.py (same seed, same randomisation, same tiny BPE and
VAE) and writes nothing else. Regenerate with the environment make_fixtures.py names:

    /tmp/fx/bin/python scripts/make_sdxl_fixtures.py
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import (  # noqa: E402
    PROMPTS,
    ROOT,
    SEED,
    TINY_VAE,
    _tiny_bpe,
    _tiny_clip_config,
    grad_of,
    randomize_,
    save_io,
)

# The second text encoder: wider than the first, exact GELU, end token found by argmax (as
# SDXL's OpenCLIP bigG config, eos_token_id = 2, does), a projection to 24.
def _tiny_clip2_config(vocab):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=24,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=32 + 48,
    use_linear_projection=True,
    norm_num_groups=4,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,
)


def unet_io(unet, out_dir) -> None:
    """Inputs, output and gradients (w.r.t. the sample and the pooled embedding) of the UNet."""
    g = torch.Generator().manual_seed(SEED + 150)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timestep = torch.tensor([17.0, 503.0])
    ctx = torch.randn(2, 7, TINY_SDXL_UNET["cross_attention_dim"], generator=g)
    text_embeds = torch.randn(2, 24, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 768.0, 16.0, 32.0, 640.0, 640.0]])

    def fn(x, pooled=text_embeds):
        return unet(x, timestep, ctx, added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids)).sample

    out, w, grad = grad_of(fn, sample, SEED + 250)
    pooled = text_embeds.clone().requires_grad_(True)
    (fn(sample, pooled) * w).sum().backward()
    save_io(os.path.join(out_dir, "io.safetensors"),
            dict(sample=sample, timestep=timestep, encoder_hidden_states=ctx, text_embeds=text_embeds,
                 time_ids=time_ids, out=out, w=w, grad_sample=grad, grad_text_embeds=pooled.grad))


def text_encoder_2_io(model, tokenizer, out_dir) -> None:
    """The projected pooled output and the penultimate hidden state of two prompts."""
    ids = [tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS[:2]]
    input_ids = torch.tensor(ids, dtype=torch.int64)
    with torch.no_grad():
        res = model(input_ids=input_ids, output_hidden_states=True)
    save_io(os.path.join(out_dir, "io.safetensors"),
            dict(input_ids=input_ids, last_hidden_state=res.last_hidden_state, text_embeds=res.text_embeds,
                 penultimate=res.hidden_states[-2]))


def sdxl_fixture() -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out_dir = os.path.join(ROOT, "sdxl_tiny")
    vocab, merges = _tiny_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
    torch.manual_seed(SEED + 60)
    text_encoder = CLIPTextModel(_tiny_clip_config(vocab)).eval()
    randomize_(text_encoder, SEED + 60)
    torch.manual_seed(SEED + 61)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip2_config(vocab)).eval()
    randomize_(text_encoder_2, SEED + 61)
    torch.manual_seed(SEED + 62)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET).eval()
    randomize_(unet, SEED + 62)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    torch.manual_seed(SEED + 63)
    vae = AutoencoderKL(**dict(TINY_VAE, scaling_factor=0.13025)).eval()
    randomize_(vae, SEED + 63)
    # SDXL base's scheduler config.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # The unit tests' inputs and outputs beside the components they test (the loaders read
    # only their own files).
    unet_io(unet, os.path.join(out_dir, "unet"))
    text_encoder_2_io(text_encoder_2, tokenizer_2, os.path.join(out_dir, "text_encoder_2"))

    prompt, steps, guidance, size = "a photo of the cat", 4, 3.0, 16
    g = torch.Generator().manual_seed(SEED + 160)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    run = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)
    with torch.no_grad():
        final = pipe(prompt, latents=latents.clone(), output_type="latent", **run).images
        image = pipe(prompt, latents=latents.clone(), output_type="pt", **run).images
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    save_io(os.path.join(out_dir, "io.safetensors"),
            dict(latents=latents, final_latents=final, image=image, prompt_embeds=embeds, pooled_prompt_embeds=pooled))
    with open(os.path.join(out_dir, "io.json"), "w") as f:
        json.dump(dict(prompt=prompt, steps=steps, guidance=guidance, size=size,
                       timesteps=pipe.scheduler.timesteps.tolist()), f, indent=1)


def clip_skip_fixtures() -> None:
    """Prompt embeddings with `clip_skip = 1` (the layer before CLIP's last) as both pipelines
    compute them: SD 1.x/2.x take that hidden state through the final LayerNorm, SDXL takes
    the one before it, without. Written as `clip_skip.safetensors` into `sd_tiny` (made by
    make_fixtures.py, read back here) and `sdxl_tiny`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    prompt = "a photo of the cat"
    sd = StableDiffusionPipeline.from_pretrained(os.path.join(ROOT, "sd_tiny"), safety_checker=None)
    sdxl = StableDiffusionXLPipeline.from_pretrained(os.path.join(ROOT, "sdxl_tiny"))
    with torch.no_grad():
        # StableDiffusionPipeline.encode_prompt(clip_skip=1) reads `text_encoder.text_model`,
        # which transformers 5 no longer has; this is its computation.
        ids = sd.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        states = sd.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states
        sd_embeds = sd.text_encoder.final_layer_norm(states[-(1 + 1)])
        sdxl_embeds, _, pooled, _ = sdxl.encode_prompt(prompt, do_classifier_free_guidance=False, clip_skip=1)
    save_io(os.path.join(ROOT, "sd_tiny", "clip_skip.safetensors"), dict(prompt_embeds=sd_embeds))
    save_io(os.path.join(ROOT, "sdxl_tiny", "clip_skip.safetensors"),
            dict(prompt_embeds=sdxl_embeds, pooled_prompt_embeds=pooled))


def main() -> None:
    sdxl_fixture()
    clip_skip_fixtures()
    print("wrote sdxl_tiny and sd_tiny/clip_skip.safetensors under", os.path.abspath(ROOT))


if __name__ == "__main__":
    main()
