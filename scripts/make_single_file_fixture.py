#!/usr/bin/env python3
"""Build models/fixtures/sd_tiny_single and sdxl_tiny_single.

sd_tiny_single: sd_tiny's UNet, VAE and text encoder in one file, in the
original (LDM, A1111/civitai "single file") layout that diffusers' `from_single_file` reads:
`model.diffusion_model.input_blocks.…`, `first_stage_model.encoder.down.…` (attention projections
as 1x1 convolutions), `cond_stage_model.transformer.text_model.…`, plus the DDPM buffers such files
carry. Stored in float16, as most such files are.

The layout is written here from diffusers' key names, then checked by loading the file back with
diffusers' `StableDiffusionPipeline.from_single_file(…, config=sd_tiny)`: every weight must equal
sd_tiny's rounded to float16. `io.safetensors`: the final latents of sd_tiny's reference run (4
DDIM steps, guidance 3, its latents) with that pipeline.

Beside it, `sd15_keys.json` (every UNet and VAE key of SD 1.5's layout, checked against diffusers'
conversion: `sd15_layout`) and `sd2_text_encoder.safetensors` (sd_tiny's text encoder alone in
SD 2.x's OpenCLIP layout: `sd2_text_encoder`). sdxl_tiny_single: sdxl_tiny the same way in SDXL's
layout, read back by StableDiffusionXLPipeline.from_single_file, and its run (`sdxl_single`);
sd_tiny_single/controlnet.safetensors: controlnet_tiny's ControlNet in the original layout, read back
by ControlNetModel.from_single_file (`controlnet_single`).

Run make_fixtures.py and make_sdxl_fixtures.py first (they write sd_tiny and sdxl_tiny).
Regenerate with:

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
                 "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                 "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
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


def open_clip_to_ldm(state: dict, prefix: str) -> dict:
    """A transformers CLIP text encoder in OpenCLIP's layout (SD 2.x's `cond_stage_model.model.`,
    SDXL's second encoder): q, k and v fused into `in_proj`, `text_projection` as the matrix
    x @ P (the transpose of the linear layer's weight)."""
    out = {}
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    for key, value in state.items():
        if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            if m[2] != "q":
                continue
            i, kind = m[1], m[3]
            fused = torch.cat([state[f"encoder.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = fused
            continue
        new = {"embeddings.token_embedding.weight": "token_embedding.weight",
               "embeddings.position_embedding.weight": "positional_embedding",
               "text_projection.weight": "text_projection"}.get(key)
        if new == "text_projection":
            value = value.T.contiguous()
        if new is None:
            new = key.replace("final_layer_norm.", "ln_final.")
            if key.startswith("encoder.layers."):
                new = ("transformer." + key.replace("encoder.layers.", "resblocks.")
                       .replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
                       .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
        out[prefix + new] = value
    return out


def half(state: dict) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def same_weights(ours, theirs, name) -> None:
    """`theirs` (read back from a single file) equals `ours` rounded to float16."""
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert ours.keys() == theirs.keys(), (name, set(ours) ^ set(theirs))
    for key in ours:
        if ours[key].dtype.is_floating_point:
            assert torch.equal(ours[key].to(torch.float16).float(), theirs[key].float()), f"{name}: {key}"


def sdxl_single() -> None:
    """sdxl_tiny_single: sdxl_tiny in SDXL's single-file layout (`conditioner.embedders.0.transformer.`
    for CLIP-L, `conditioner.embedders.1.model.` for the OpenCLIP encoder), read back by
    diffusers' StableDiffusionXLPipeline.from_single_file(…, config=sdxl_tiny), and its run."""
    from diffusers import StableDiffusionXLPipeline

    base = os.path.join(ROOT, "sdxl_tiny")
    out_dir = os.path.join(ROOT, "sdxl_tiny_single")
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    checkpoint = {}
    checkpoint.update(unet_to_ldm(half(pipe.unet.state_dict()), pipe.unet.config))
    checkpoint.update(vae_to_ldm(half(pipe.vae.state_dict()), pipe.vae.config))
    for key, value in half(pipe.text_encoder.state_dict()).items():
        checkpoint["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = value
    checkpoint.update(open_clip_to_ldm(half(pipe.text_encoder_2.state_dict()), "conditioner.embedders.1.model."))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    save_file(checkpoint, path)
    single = StableDiffusionXLPipeline.from_single_file(path, config=base, torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        same_weights(getattr(pipe, name), getattr(single, name), name)
    single.scheduler = pipe.scheduler
    with open(os.path.join(base, "io.json")) as f:
        meta = json.load(f)
    from safetensors.torch import load_file
    latents = load_file(os.path.join(base, "io.safetensors"))["latents"]
    with torch.no_grad():
        final = single(meta["prompt"], num_inference_steps=meta["steps"], guidance_scale=meta["guidance"],
                       latents=latents.clone(), output_type="latent").images
    save_io(os.path.join(out_dir, "io.safetensors"), dict(latents=latents, final_latents=final))
    with open(os.path.join(out_dir, "io.json"), "w") as f:
        json.dump(dict(prompt=meta["prompt"], steps=meta["steps"], guidance=meta["guidance"]), f, indent=1)
    print("wrote", out_dir, os.path.getsize(path), "bytes")


def sd2_text_encoder() -> None:
    """sd_tiny_single/sd2_text_encoder.safetensors: sd_tiny's text encoder alone in SD 2.x's
    single-file layout (`cond_stage_model.model.`, OpenCLIP), checked with diffusers'
    convert_open_clip_checkpoint back into sd_tiny's (f16) weights."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(os.path.join(SD_DIR, "text_encoder"))
    checkpoint = open_clip_to_ldm(half(encoder.state_dict()), "cond_stage_model.model.")
    back = convert_open_clip_checkpoint(encoder, checkpoint, prefix="cond_stage_model.model.")
    ours = {k.removeprefix("text_model."): v for k, v in half(encoder.state_dict()).items()}
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert set(ours) - {"embeddings.position_ids"} == set(back), set(ours) ^ set(back)
    for key, value in back.items():
        assert torch.equal(ours[key], value), key
    save_file(checkpoint, os.path.join(OUT_DIR, "sd2_text_encoder.safetensors"))
    print("wrote sd2_text_encoder.safetensors")


def controlnet_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers ControlNet in the original layout (lllyasviel's control_v11*.pth, as
    safetensors): its copy of the UNet's input path numbered as the UNet's, `input_hint_block.{2j}`
    for the conditioning embedding's convolutions, `zero_convs.{i}.0`, `middle_block_out.0`."""
    unet_like = {}
    out = {}
    for key, value in state.items():
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
            out[f"control_model.zero_convs.{m[1]}.0.{m[2]}"] = value
        elif key.startswith("controlnet_mid_block."):
            out["control_model.middle_block_out.0." + key.removeprefix("controlnet_mid_block.")] = value
        elif m := re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.*)", key):
            # conv_out is always `.14` (after SD's three stages; diffusers' converter looks there).
            index = 0 if m[1] == "conv_in" else 14 if m[1] == "conv_out" else 2 * (int(m[2]) + 1)
            out[f"control_model.input_hint_block.{index}.{m[3]}"] = value
        else:
            unet_like[key] = value
    config = dict(config, up_block_types=[t.replace("Down", "Up") for t in reversed(config["down_block_types"])])
    for key, value in unet_to_ldm(unet_like, config).items():
        out["control_model." + key.removeprefix("model.diffusion_model.")] = value
    return out


def controlnet_single() -> None:
    """controlnet_tiny's ControlNet as one file in the original layout, read back by diffusers'
    ControlNetModel.from_single_file(…, config=controlnet_tiny/controlnet) to its weights in f16."""
    from diffusers import ControlNetModel

    base = os.path.join(ROOT, "controlnet_tiny", "controlnet")
    controlnet = ControlNetModel.from_pretrained(base)
    checkpoint = controlnet_to_ldm(half(controlnet.state_dict()), controlnet.config)
    path = os.path.join(OUT_DIR, "controlnet.safetensors")
    save_file(checkpoint, path)
    single = ControlNetModel.from_single_file(path, config=base, torch_dtype=torch.float32)
    same_weights(controlnet, single, "controlnet")
    print("wrote", path, os.path.getsize(path), "bytes")


def main() -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SD_DIR, safety_checker=None)
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
        same_weights(getattr(pipe, name), getattr(single, name), name)
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
    sd2_text_encoder()
    sdxl_single()
    controlnet_single()
