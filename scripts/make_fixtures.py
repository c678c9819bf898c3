#!/usr/bin/env python3
"""Build the parity fixtures of `adjoint-dpm-models` (models/fixtures/).

Each network is a tiny random configuration of the reference PyTorch implementation
(diffusers, torchvision, transformers), built with a fixed seed. For each one we write

* its weights as safetensors, in the reference key layout (what a real checkpoint holds),
* its config.json where the reference has one (diffusers, transformers),
* `io.safetensors`: the inputs, the output, a fixed cotangent `w` and the gradient of
  `sum(output * w)` with respect to the continuous input.

The Rust tests load the weights through the crate's real loading path and compare.
CI never runs this script; its outputs are committed. Regenerate with

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch torchvision diffusers transformers safetensors
    /tmp/fx/bin/python scripts/make_fixtures.py

Versions used for the committed fixtures are written to models/fixtures/VERSIONS.txt.
"""

import json
import math
import os
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "fixtures")
SEED = 20240611


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Replace every parameter and float buffer by seeded random values of a sane scale.

    Reference initialisations zero some layers (e.g. diffusers' proj_out or torchvision's
    zero-init residual), which would let a parity test pass while a layer is ignored.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.dtype.is_floating_point:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif leaf == "running_mean":
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 and ("norm" in name or "bn" in name or "layer_norm" in name or ".downsample.1." in name):
                if leaf == "weight":
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                if "embedding" in name:
                    fan_in = 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def save_io(path: str, tensors: dict) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)


def grad_of(fn, x: torch.Tensor, seed: int):
    """Output of fn(x), the cotangent w and d sum(fn(x) * w) / dx."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * w).sum().backward()
    return out.detach(), w, x.grad.detach()


def unet_fixtures() -> None:
    from diffusers import UNet2DConditionModel

    variants = {
        # SD 1.x-like: conv proj_in/out, one head count for all blocks, a class-embedding table.
        "unet_tiny": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=4,
            num_class_embeds=10,
        ),
        # SD 2.x-like: linear proj_in/out, per-block head counts, two transformer layers, a
        # cross-attention mid block under plain down blocks; weights stored in float16.
        "unet_tiny_linear_fp16": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=24,
            attention_head_dim=[2, 4],
            transformer_layers_per_block=[1, 2],
            use_linear_projection=True,
            norm_num_groups=4,
            flip_sin_to_cos=False,
            freq_shift=1,
        ),
    }
    for i, (name, cfg) in enumerate(variants.items()):
        torch.manual_seed(SEED + i)
        model = UNet2DConditionModel(**cfg).eval()
        randomize_(model, SEED + i)
        fp16 = name.endswith("fp16")
        if fp16:
            # The reference runs the f16-rounded weights in f32, as our loader does.
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.half().float())
        out_dir = os.path.join(ROOT, name)
        os.makedirs(out_dir, exist_ok=True)
        model.save_config(out_dir)
        state = {k: (v.half() if fp16 else v) for k, v in model.state_dict().items()}
        fname = "diffusion_pytorch_model.fp16.safetensors" if fp16 else "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, fname))

        g = torch.Generator().manual_seed(SEED + 100 + i)
        b = 2
        sample = torch.randn(b, cfg["in_channels"], 16, 16, generator=g)
        timestep = torch.tensor([17.0, 503.0])
        ctx = torch.randn(b, 7, cfg["cross_attention_dim"], generator=g)
        labels = torch.tensor([3, 7], dtype=torch.int64) if "num_class_embeds" in cfg else None

        def fn(x):
            return model(x, timestep, ctx, class_labels=labels).sample

        out, w, grad = grad_of(fn, sample, SEED + 200 + i)
        io = dict(sample=sample, timestep=timestep, encoder_hidden_states=ctx, out=out, w=w, grad_sample=grad)
        if labels is not None:
            io["class_labels"] = labels
        save_io(os.path.join(out_dir, "io.safetensors"), io)


class _TinyResNet(torch.nn.Module):
    """torchvision's ResNet with the stem width as a knob (torchvision fixes it at 64).

    Built with torchvision's own `_make_layer` and `_forward_impl`, so the key layout and the
    forward pass are torchvision's.
    """

    def __init__(self, block, layers, stem_width, num_classes):
        from torchvision.models import resnet as tv

        super().__init__()
        self._norm_layer = torch.nn.BatchNorm2d
        self.inplanes = stem_width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = torch.nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(stem_width)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        make = tv.ResNet._make_layer
        self.layer1 = make(self, block, stem_width, layers[0])
        self.layer2 = make(self, block, stem_width * 2, layers[1], stride=2)
        self.layer3 = make(self, block, stem_width * 4, layers[2], stride=2)
        self.layer4 = make(self, block, stem_width * 8, layers[3], stride=2)
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(stem_width * 8 * block.expansion, num_classes)

    def forward(self, x):
        from torchvision.models import resnet as tv

        return tv.ResNet._forward_impl(self, x)


def resnet_fixtures() -> None:
    import torch.nn.functional as F
    from torchvision.models import resnet as tv

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    variants = {
        "resnet_tiny_bottleneck": (tv.Bottleneck, [1, 2, 1, 1]),
        "resnet_tiny_basic": (tv.BasicBlock, [2, 1, 1, 1]),
    }
    for i, (name, (block, layers)) in enumerate(variants.items()):
        torch.manual_seed(SEED + 10 + i)
        model = _TinyResNet(block, layers, stem_width=8, num_classes=10).eval()
        randomize_(model, SEED + 10 + i)
        out_dir = os.path.join(ROOT, name)
        os.makedirs(out_dir, exist_ok=True)
        # torchvision checkpoints are state dicts (num_batches_tracked included); the basic
        # variant is a .pth as torchvision ships them, the bottleneck one safetensors.
        state = model.state_dict()
        if block is tv.BasicBlock:
            torch.save(state, os.path.join(out_dir, "model.pth"))
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, "model.safetensors"))

        g = torch.Generator().manual_seed(SEED + 110 + i)
        image = torch.rand(2, 3, 40, 48, generator=g)

        def fn(x):
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
            return model((x - mean) / std)

        out, w, grad = grad_of(fn, image, SEED + 210 + i)
        save_io(os.path.join(out_dir, "io.safetensors"), dict(image=image, out=out, w=w, grad_image=grad))


# The tiny AutoencoderKL of the VAE fixture and of the tiny SD pipeline.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
    scaling_factor=0.18215,
)


def vae_fixtures() -> None:
    from diffusers import AutoencoderKL

    cfg = TINY_VAE
    torch.manual_seed(SEED + 20)
    model = AutoencoderKL(**cfg).eval()
    randomize_(model, SEED + 20)
    out_dir = os.path.join(ROOT, "vae_tiny")
    os.makedirs(out_dir, exist_ok=True)
    model.save_config(out_dir)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "diffusion_pytorch_model.safetensors"))

    g = torch.Generator().manual_seed(SEED + 120)
    latents = torch.randn(2, 4, 8, 8, generator=g)

    def fn(z):
        return model.decode(z / cfg["scaling_factor"]).sample

    out, w, grad = grad_of(fn, latents, SEED + 220)
    image = torch.rand(2, 3, 16, 16, generator=g)
    posterior = model.encode(image * 2 - 1).latent_dist
    save_io(
        os.path.join(out_dir, "io.safetensors"),
        dict(
            latents=latents,
            out=out,
            w=w,
            grad_latents=grad,
            image=image,
            encoded_mean=posterior.mean.detach() * cfg["scaling_factor"],
        ),
    )


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_fixtures() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = os.path.join(ROOT, "clip_tiny")
    os.makedirs(out_dir, exist_ok=True)

    vocab, merges = _tiny_bpe()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(out_dir)

    ids = [tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS]
    with open(os.path.join(out_dir, "tokens.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "input_ids": ids}, f, ensure_ascii=False, indent=1)

    cfg = _tiny_clip_config(vocab)
    torch.manual_seed(SEED + 30)
    model = CLIPTextModel(cfg).eval()
    randomize_(model, SEED + 30)
    cfg.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))

    input_ids = torch.tensor([ids[0], ids[4]], dtype=torch.int64)
    with torch.no_grad():
        res = model(input_ids=input_ids)
    save_io(
        os.path.join(out_dir, "io.safetensors"),
        dict(input_ids=input_ids, last_hidden_state=res.last_hidden_state, pooler_output=res.pooler_output),
    )


# Prompts that exercise the CLIP tokenizer's normalisation, splitting, merges and truncation.
PROMPTS = [
    "a photo of the cat",
    "A PHOTO   of\tthe\nCat!!",
    "",
    "don't, it's they're we'll I'd you've",
    "café naïve résumé, 東京 and 🐱🚀",
    "1234 apples + 56.7% = $8",
    "an astronaut riding a horse, " * 12,
    "<|endoftext|> in the middle",
    "  leading and trailing spaces  ",
]


def _tiny_bpe():
    """A tiny CLIP BPE: every byte (alone and word-final) plus a few merges, so that
    multi-character tokens, word ends and unknown words all occur."""
    chars = list(_bytes_to_unicode().values())
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [
        ("a", "t</w>"), ("t", "h"), ("i", "n"), ("e", "r"), ("o", "n</w>"), ("th", "e</w>"),
        ("c", "at</w>"), ("a", "n"), ("an", "d</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"),
        ("phot", "o</w>"), ("o", "f</w>"), ("s", "t"), ("st", "y"), ("in", "g</w>"),
    ]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def _tiny_clip_config(vocab):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=16,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def sd_fixtures() -> None:
    """A whole tiny Stable Diffusion pipeline in the diffusers layout (what `--weights DIR`
    reads), a tiny ResNet classifier with its architecture beside it, and a reference run of
    diffusers' StableDiffusionPipeline (prompt -> CLIP -> CFG -> DDIM -> VAE) from fixed noise.

    The tokenizer is stored as vocab.json + merges.txt only, as SD 1.x repositories ship it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from torchvision.models import resnet as tv

    out_dir = os.path.join(ROOT, "sd_tiny")
    vocab, merges = _tiny_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(SEED + 40)
    text_encoder = CLIPTextModel(_tiny_clip_config(vocab)).eval()
    randomize_(text_encoder, SEED + 40)
    torch.manual_seed(SEED + 41)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    randomize_(unet, SEED + 41)
    # Keep the random UNet's output at the scale of a trained one (unit-variance noise
    # predictions), so that sampling stays in a sane range.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    torch.manual_seed(SEED + 42)
    vae = AutoencoderKL(**TINY_VAE).eval()
    randomize_(vae, SEED + 42)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # The tokenizer folder as SD 1.x ships it: vocab.json + merges.txt, no tokenizer.json.
    tok_dir = os.path.join(out_dir, "tokenizer")
    for f in os.listdir(tok_dir):
        os.remove(os.path.join(tok_dir, f))
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    with open(os.path.join(tok_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=1)
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump(dict(special, model_max_length=77, tokenizer_class="CLIPTokenizer"), f, indent=1)
    reloaded = CLIPTokenizer.from_pretrained(tok_dir)
    ids = [reloaded(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS]
    with open(os.path.join(out_dir, "tokens.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "input_ids": ids}, f, ensure_ascii=False, indent=1)

    # The classifier: a tiny torchvision ResNet (Bottleneck) with its architecture as our
    # ResNetConfig JSON next to the weights (without it the CLI assumes ResNet-50).
    cls_dir = os.path.join(ROOT, "sd_tiny_classifier")
    os.makedirs(cls_dir, exist_ok=True)
    torch.manual_seed(SEED + 43)
    resnet = _TinyResNet(tv.Bottleneck, [1, 1, 1, 1], stem_width=8, num_classes=10).eval()
    randomize_(resnet, SEED + 43)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, os.path.join(cls_dir, "model.safetensors"))
    with open(os.path.join(cls_dir, "model.json"), "w") as f:
        json.dump(dict(block="Bottleneck", layers=[1, 1, 1, 1], stem_width=8, groups=1, width_per_group=64,
                       num_classes=10), f, indent=1)

    # A reference run: 4 DDIM steps with guidance 3 from fixed latents.
    prompt, steps, guidance = "a photo of the cat", 4, 3.0
    g = torch.Generator().manual_seed(SEED + 140)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        final = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                     output_type="latent").images
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                     output_type="pt").images
        cond = text_encoder(torch.tensor([ids[0]]))[0]
        uncond = text_encoder(torch.tensor([ids[2]]))[0]
    save_io(os.path.join(out_dir, "io.safetensors"),
            dict(latents=latents, final_latents=final, image=image, prompt_embeds=cond, negative_embeds=uncond))
    with open(os.path.join(out_dir, "io.json"), "w") as f:
        json.dump(dict(prompt=prompt, steps=steps, guidance=guidance, timesteps=pipe.scheduler.timesteps.tolist()),
                  f, indent=1)


def main() -> None:
    import diffusers
    import torchvision
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(ROOT, exist_ok=True)
    which = sys.argv[1:] or ["unet", "resnet", "vae", "clip", "sd"]
    for w in which:
        globals()[f"{w}_fixtures"]()
    with open(os.path.join(ROOT, "VERSIONS.txt"), "w") as f:
        f.write(
            f"python {sys.version.split()[0]}\ntorch {torch.__version__}\ndiffusers {diffusers.__version__}\n"
            f"transformers {transformers.__version__}\ntorchvision {torchvision.__version__}\nseed {SEED}\n"
        )


if __name__ == "__main__":
    main()
