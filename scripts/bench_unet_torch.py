#!/usr/bin/env python3
"""PyTorch + diffusers baseline for examples/bench_unet.rs, run on the same machine.

Same work as the Rust bench: the UNet2DConditionModel at a config (random weights), batch 1,
forward without a graph, and a VJP = forward with a graph + backward of <eps, w> to the latent and
every weight. Prints one JSON line per dtype: median seconds, warm-up, peak memory allocated.

    python3 scripts/bench_unet_torch.py --config sd15 --device cuda --dtype f32 f16
"""
import argparse
import json
import time

import torch
from diffusers import UNet2DConditionModel

CONFIGS = {
    # Stable Diffusion 1.5's unet/config.json (the fields that differ from diffusers' defaults).
    "sd15": (
        dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        64,
        77,
    ),
    # SDXL base's unet/config.json (models/configs/sdxl_unet.json), with its added conditions.
    "sdxl": (
        dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_embed_type_num_heads=64,
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        128,
        77,
    ),
    # examples/bench_unet.rs's TINY.
    "tiny": (
        dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
            sample_size=16,
        ),
        16,
        8,
    ),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="sd15", choices=CONFIGS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", nargs="+", default=["f32"], choices=["f32", "f16"])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cfg, size, tokens = CONFIGS[args.config]
    dev = torch.device(args.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for name in args.dtype:
        dtype = {"f32": torch.float32, "f16": torch.float16}[name]
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg).to(dev, dtype)
        sample = torch.randn(1, 4, size, size, device=dev, dtype=dtype)
        context = torch.randn(1, tokens, cfg["cross_attention_dim"], device=dev, dtype=dtype)
        t = torch.tensor([500.0], device=dev)
        w = torch.randn_like(sample)
        # SDXL's added conditions: a pooled embedding and an uncropped 1024² image's sizes.
        added = None
        if cfg.get("addition_embed_type") == "text_time":
            added = dict(text_embeds=torch.randn(1, 1280, device=dev, dtype=dtype),
                         time_ids=torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=dev, dtype=dtype))

        def forward():
            with torch.no_grad():
                out = unet(sample, t, context, added_cond_kwargs=added).sample
            return out

        def vjp():
            unet.zero_grad(set_to_none=True)
            x = sample.clone().requires_grad_(True)
            out = unet(x, t, context, added_cond_kwargs=added).sample
            (out * w).sum().backward()
            return x.grad

        def timed(f):
            sync()
            start = time.perf_counter()
            f()
            sync()
            warmup = time.perf_counter() - start
            times = []
            for _ in range(max(args.reps, 1)):
                start = time.perf_counter()
                f()
                sync()
                times.append(time.perf_counter() - start)
            times.sort()
            return times[len(times) // 2], warmup

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        forward_s, forward_warmup_s = timed(forward)
        vjp_s, vjp_warmup_s = timed(vjp)
        line = {
            "impl": f"torch {torch.__version__}",
            "config": args.config,
            "dtype": name,
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "params": sum(p.numel() for p in unet.parameters()),
            "forward_s": forward_s,
            "vjp_s": vjp_s,
            "forward_warmup_s": forward_warmup_s,
            "vjp_warmup_s": vjp_warmup_s,
            "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if dev.type == "cuda" else None,
        }
        print(json.dumps(line), flush=True)
        del unet
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
