#!/usr/bin/env python3
"""Build models/fixtures/sd_tiny_single: sd_tiny's UNet, VAE and text encoder in one file, in the
original (LDM, A1111/civitai "single file") layout that diffusers' `from_single_file` reads:
`model.diffusion_model.input_blocks.…`, `first_stage_model.encoder.down.…` (attention projections
as 1x1 convolutions), `cond_stage_model.transformer.text_model.…`, plus the DDPM buffers such files
carry. Stored in float16, as most such files are.

The layout is written here from diffusers' key names, then checked by loading the file back with
diffusers' `StableDiffusionPipeline.from_single_file(…, config=sd_tiny)`: every weight must equal
sd_tiny's rounded to float16. `io.safetensors`: the final latents of sd_tiny's reference run (4
DDIM steps, guidance 3, its latents) with that pipeline.

Run make_fixtures.py first (it writes sd_tiny). Regenerate with:

    /tmp/fx/bin/python scripts/make_single_file_fixture.py
"""

import json
import os
import re
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import ROOT, save_io  # noqa: E402

SD_DIR = os.path.join(ROOT, "sd_tiny")
OUT_DIR = os.path.join(ROOT, "sd_tiny_single")

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
          ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def resnet_names(rest: str) -> str:
    for new, old in RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(state: dict, config: dict) -> dict:
    layers = config["layers_per_block"]
    out = {}
    for key, value in state.items():
        fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                 "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
        new = None
        for a, b in fixed.items():
            if key.startswith(a):
                new = b + key[len(a):]
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = 1 + b * (layers + 1) + j
            new = f"input_blocks.{i}.0.{resnet_names(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{resnet_names(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = b * (layers + 1) + j
            new = f"output_blocks.{i}.0.{resnet_names(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            has_attention = config["up_block_types"][b].startswith("CrossAttn")
            new = f"output_blocks.{b * (layers + 1) + layers}.{2 if has_attention else 1}.conv.{m[2]}"
        assert new is not None, key
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    n = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out.", "norm_out.")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            rest = m[2]
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            new = f"{m[1]}.mid.attn_1.{rest}"
            if value.dim() == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        new = new.replace("conv_shortcut.", "nin_shortcut.")
        out["first_stage_model." + new] = value
    return out


def main() -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SD_DIR, safety_checker=None)
    half = lambda state: {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}  # noqa: E731
    checkpoint = {}
    checkpoint.update(unet_to_ldm(half(pipe.unet.state_dict()), pipe.unet.config))
    checkpoint.update(vae_to_ldm(half(pipe.vae.state_dict()), pipe.vae.config))
    for key, value in half(pipe.text_encoder.state_dict()).items():
        checkpoint["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    # The DDPM buffers an LDM checkpoint carries beside the networks.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    checkpoint["betas"] = betas.to(torch.float16)
    checkpoint["alphas_cumprod"] = torch.cumprod(1 - betas, 0).to(torch.float16)
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "model.safetensors")
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, path)

    # diffusers reads the file back into sd_tiny's weights, rounded to float16.
    single = StableDiffusionPipeline.from_single_file(path, config=SD_DIR, safety_checker=None,
                                                      torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(single, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            if not ours[key].dtype.is_floating_point:
                continue
            assert torch.equal(ours[key].to(torch.float16).float(), theirs[key].float()), f"{name}: {key}"
    single.scheduler = DDIMScheduler.from_pretrained(os.path.join(SD_DIR, "scheduler"))

    with open(os.path.join(SD_DIR, "io.json")) as f:
        meta = json.load(f)
    from safetensors.torch import load_file
    latents = load_file(os.path.join(SD_DIR, "io.safetensors"))["latents"]
    with torch.no_grad():
        final = single(meta["prompt"], num_inference_steps=meta["steps"], guidance_scale=meta["guidance"],
                       latents=latents.clone(), output_type="latent").images
    save_io(os.path.join(OUT_DIR, "io.safetensors"), dict(latents=latents, final_latents=final))
    with open(os.path.join(OUT_DIR, "io.json"), "w") as f:
        json.dump(dict(prompt=meta["prompt"], steps=meta["steps"], guidance=meta["guidance"]), f, indent=1)
    print("wrote", os.path.abspath(OUT_DIR), f"({os.path.getsize(path)} bytes, {len(checkpoint)} tensors)")



def sd15_layout() -> None:
    """sd15_keys.json: every UNet and VAE key of SD 1.5's layout (its configs, no weights: meta
    tensors), as pairs (single-file key, diffusers key), the single-file keys written by this
    script's maps and checked against diffusers' own conversion (convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint) back to the diffusers keys."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    with open(os.path.join(os.path.dirname(ROOT), "configs", "sd15_unet.json")) as f:
        unet_config = json.load(f)
    vae_config = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                      block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                      up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512)
    pairs = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    for name, model, to_ldm, back in (
            ("unet", unet, unet_to_ldm, convert_ldm_unet_checkpoint),
            ("vae", vae, vae_to_ldm, convert_ldm_vae_checkpoint)):
        # Each tensor stands for itself by its value (its rank kept: the VAE's attention is
        # reshaped on the way).
        names = list(model.state_dict().items())
        state = {k: torch.full([1] * v.dim(), float(i), dtype=torch.float64) for i, (k, v) in enumerate(names)}
        ldm = to_ldm(dict(state), model.config)
        assert len(ldm) == len(state), name
        ldm_of = {int(v.flatten()[0]): k for k, v in ldm.items()}
        converted = back(ldm, dict(model.config))
        assert set(converted) == set(state), (name, set(converted) ^ set(state))
        for key, value in converted.items():
            assert value.dim() == state[key].dim() and int(value.flatten()[0]) == int(state[key].flatten()[0]), key
        pairs[name] = sorted((ldm_of[int(state[k].flatten()[0])], k) for k in state)
    with open(os.path.join(OUT_DIR, "sd15_keys.json"), "w") as f:
        json.dump(pairs, f, separators=(",", ":"))
    print("wrote sd15_keys.json:", {k: len(v) for k, v in pairs.items()})


if __name__ == "__main__":
    main()
    sd15_layout()
