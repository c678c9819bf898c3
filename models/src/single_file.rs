//! Single-file checkpoints: the original Stable Diffusion (CompVis LDM) layout that A1111,
//! ComfyUI and most shared fine-tunes use (`v1-5-pruned-emaonly.safetensors`), with the UNet,
//! VAE and text encoder in one file under `model.diffusion_model.`, `first_stage_model.` and
//! `cond_stage_model.transformer.`.
//!
//! Its keys follow the LDM code's module tree (`input_blocks.{i}`, `middle_block`,
//! `output_blocks.{i}` numbered through the whole UNet; `in_layers`/`out_layers` in resnets;
//! the VAE's `down.{i}.block.{j}` with its decoder counted from the coarsest block; 1×1
//! convolutions for the VAE's attention). Each map below renames them into diffusers' keys,
//! from the network's config (how many layers a block holds sets the numbering), then applies
//! that network's own map; the other networks' keys and the file's DDPM buffers are ignored.
//! diffusers does the same in `loaders/single_file_utils.py`; the configs come from a diffusers
//! folder, as `from_single_file(…, config=…)` takes them.

use std::collections::HashSet;
use std::path::Path;

use crate::clip::clip_key_map;
use crate::load::{read_safetensors_header, KeyMap, LoadError};
use crate::unet::{unet_key_map, UNet2DConditionConfig};
use crate::vae::{vae_key_map, AutoencoderKLConfig};

/// The prefix of each network's keys in a single file.
const PREFIXES: [&str; 3] = [
    r"model\.diffusion_model\.",
    r"first_stage_model\.",
    r"cond_stage_model\.transformer\.",
];

/// Ignores every other network's keys (by their prefix), the EMA copy and the DDPM buffers
/// (`betas`, `alphas_cumprod`...: keys without a dot).
fn ignore_others(map: KeyMap, own: &str) -> KeyMap {
    let others = PREFIXES
        .iter()
        .copied()
        .filter(|p| *p != own)
        .chain([
            r"cond_stage_model\.",
            r"conditioner\.",
            r"model_ema\.",
            r"control_model\.",
        ])
        .collect::<Vec<_>>()
        .join("|");
    map.ignore(&format!("^({others})")).ignore(r"^[A-Za-z0-9_]+$")
}

/// The key map of a single file's UNet (`model.diffusion_model.…`) into
/// [`crate::unet::UNet2DConditionModel`], for the UNet of `config`.
pub fn ldm_unet_key_map(config: &UNet2DConditionConfig) -> Result<KeyMap, LoadError> {
    const P: &str = r"^model\.diffusion_model\.";
    let n = config.block_out_channels.len();
    let mut map = KeyMap::new()
        .rename(&format!(r"{P}time_embed\.0\."), "time_embedding.linear_1.")
        .rename(&format!(r"{P}time_embed\.2\."), "time_embedding.linear_2.")
        .rename(&format!(r"{P}input_blocks\.0\.0\."), "conv_in.")
        .rename(&format!(r"{P}out\.0\."), "conv_norm_out.")
        .rename(&format!(r"{P}out\.2\."), "conv_out.")
        .rename(&format!(r"{P}middle_block\.0\."), "mid_block.resnets.0.")
        .rename(&format!(r"{P}middle_block\.1\."), "mid_block.attentions.0.")
        .rename(&format!(r"{P}middle_block\.2\."), "mid_block.resnets.1.");
    // SDXL's added conditions, or a class embedding, sit in `label_emb`.
    let label = match (&config.addition_embed_type, &config.class_embed_type) {
        (Some(_), _) => Some("add_embedding"),
        (None, Some(_)) => Some("class_embedding"),
        (None, None) => None,
    };
    if let Some(label) = label {
        map = map
            .rename(&format!(r"{P}label_emb\.0\.0\."), &format!("{label}.linear_1."))
            .rename(&format!(r"{P}label_emb\.0\.2\."), &format!("{label}.linear_2."));
    }
    map = map.rename(&format!(r"{P}label_emb\.weight"), "class_embedding.weight");
    // input_blocks.{i}: conv_in, then each down block's (resnet, attention) layers and its
    // downsampler, numbered through.
    let mut i = 0;
    for b in 0..n {
        for l in 0..config.layers_per_block.get(b, n, "layers_per_block")? {
            i += 1;
            map = map
                .rename(
                    &format!(r"{P}input_blocks\.{i}\.0\."),
                    &format!("down_blocks.{b}.resnets.{l}."),
                )
                .rename(
                    &format!(r"{P}input_blocks\.{i}\.1\."),
                    &format!("down_blocks.{b}.attentions.{l}."),
                );
        }
        if b + 1 < n {
            i += 1;
            map = map.rename(
                &format!(r"{P}input_blocks\.{i}\.0\.op\."),
                &format!("down_blocks.{b}.downsamplers.0.conv."),
            );
        }
    }
    // output_blocks.{i}: each up block's layers, the upsampler after the last one's attention
    // (`.2.conv`) or resnet (`.1.conv`).
    let mut i = 0;
    for b in 0..n {
        let layers = config.layers_per_block.get(n - 1 - b, n, "layers_per_block")? + 1;
        for l in 0..layers {
            for index in [1, 2] {
                map = map.rename(
                    &format!(r"{P}output_blocks\.{i}\.{index}\.conv\."),
                    &format!("up_blocks.{b}.upsamplers.0.conv."),
                );
            }
            map = map
                .rename(
                    &format!(r"{P}output_blocks\.{i}\.0\."),
                    &format!("up_blocks.{b}.resnets.{l}."),
                )
                .rename(
                    &format!(r"{P}output_blocks\.{i}\.1\."),
                    &format!("up_blocks.{b}.attentions.{l}."),
                );
            i += 1;
        }
    }
    // The resnets' own layers.
    for (ldm, diffusers) in [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("emb_layers.1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ] {
        let ldm = ldm.replace('.', r"\.");
        map = map.rename(
            &format!(r"^((down_blocks|up_blocks)\.\d+\.resnets|mid_block\.resnets)\.(\d+)\.{ldm}\."),
            &format!("${{1}}.${{3}}.{diffusers}."),
        );
    }
    Ok(ignore_others(map.then(unet_key_map()), &P[1..]))
}

/// The key map of a single file's VAE (`first_stage_model.…`) into
/// [`crate::vae::AutoencoderKL`], for the VAE of `config`.
pub fn ldm_vae_key_map(config: &AutoencoderKLConfig) -> KeyMap {
    let n = config.up_block_types.len();
    let mut map = KeyMap::new()
        .rename(r"^first_stage_model\.", "")
        .rename(r"^(encoder|decoder)\.norm_out\.", "${1}.conv_norm_out.")
        .rename(r"^encoder\.down\.(\d+)\.block\.", "encoder.down_blocks.${1}.resnets.")
        .rename(
            r"^encoder\.down\.(\d+)\.downsample\.conv\.",
            "encoder.down_blocks.${1}.downsamplers.0.conv.",
        )
        .rename(r"^(encoder|decoder)\.mid\.block_1\.", "${1}.mid_block.resnets.0.")
        .rename(r"^(encoder|decoder)\.mid\.block_2\.", "${1}.mid_block.resnets.1.");
    // The decoder's `up.{k}` counts from the finest block, diffusers' `up_blocks` from the
    // coarsest.
    for k in 0..n {
        let b = n - 1 - k;
        map = map
            .rename(
                &format!(r"^decoder\.up\.{k}\.block\."),
                &format!("decoder.up_blocks.{b}.resnets."),
            )
            .rename(
                &format!(r"^decoder\.up\.{k}\.upsample\.conv\."),
                &format!("decoder.up_blocks.{b}.upsamplers.0.conv."),
            );
    }
    for (ldm, diffusers) in [
        ("norm", "group_norm"),
        ("q", "to_q"),
        ("k", "to_k"),
        ("v", "to_v"),
        ("proj_out", "to_out.0"),
    ] {
        map = map.rename(
            &format!(r"^(encoder|decoder)\.mid\.attn_1\.{ldm}\."),
            &format!("${{1}}.mid_block.attentions.0.{diffusers}."),
        );
    }
    let map = map
        .rename(r"\.nin_shortcut\.", ".conv_shortcut.")
        .then(vae_key_map())
        .squeeze(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out)\.weight$");
    ignore_others(map, PREFIXES[1])
}

/// The key map of a single file's CLIP text encoder (`cond_stage_model.transformer.…`, SD
/// 1.x) into [`crate::clip::ClipTextModel`].
pub fn ldm_clip_key_map() -> KeyMap {
    let map = KeyMap::new()
        .rename(r"^cond_stage_model\.transformer\.", "")
        .then(clip_key_map());
    ignore_others(map, PREFIXES[2])
}

/// What a single file holds, from its keys: whether it is SD 1.x's layout (a CLIP text encoder
/// under `cond_stage_model.transformer.`), or names the one it is (SD 2.x's OpenCLIP, SDXL's
/// two encoders) in the error.
pub fn check_single_file(path: &Path) -> Result<(), LoadError> {
    let corrupt = |message: String| LoadError::Corrupt {
        path: path.into(),
        format: "safetensors",
        message,
    };
    let header = read_safetensors_header(path).map_err(corrupt)?;
    let keys: HashSet<&str> = header
        .as_object()
        .map(|tensors| tensors.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let has = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
    if has("conditioner.embedders.") {
        return Err(LoadError::Unsupported(
            "a single-file SDXL checkpoint (conditioner.embedders.*: its OpenCLIP text encoder's fused \
             attention); convert it with diffusers' from_single_file + save_pretrained"
                .into(),
        ));
    }
    if has("cond_stage_model.model.") {
        return Err(LoadError::Unsupported(
            "a single-file SD 2.x checkpoint (cond_stage_model.model.*: an OpenCLIP text encoder); convert it \
             with diffusers' from_single_file + save_pretrained"
                .into(),
        ));
    }
    if !has("model.diffusion_model.") {
        return Err(corrupt(
            "no model.diffusion_model.* keys: not a single-file Stable Diffusion checkpoint".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::{load_clip_text, ClipTextConfig};
    use crate::load::{load_safetensors, read_config};
    use crate::testing::{fixture, TestBackend};
    use crate::unet::load_unet;
    use crate::vae::load_vae;
    use burn::module::Module;
    use burn::tensor::DType;
    use burn_store::ModuleSnapshot;

    /// Every tensor of `ours` equals `folder`'s rounded to f16 (the single file's dtype).
    fn same_weights<M: Module<TestBackend>>(ours: &M, folder: &M, what: &str) {
        let theirs: std::collections::HashMap<String, _> = folder
            .collect(None, None, true)
            .into_iter()
            .map(|s| (s.full_path(), s))
            .collect();
        let ours = ours.collect(None, None, true);
        assert_eq!(ours.len(), theirs.len(), "{what}");
        for snapshot in ours {
            let path = snapshot.full_path();
            let a = snapshot.to_data().unwrap();
            let b = theirs[&path].to_data().unwrap();
            if a.dtype != DType::F32 {
                assert_eq!(a, b, "{what}: {path}");
                continue;
            }
            let b = b.convert_dtype(DType::F16).convert_dtype(DType::F32);
            assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap(), "{what}: {path}");
        }
    }

    /// sd_tiny's networks from the single file (made by scripts/make_single_file_fixture.py
    /// and read back by diffusers' from_single_file) equal the folder's, in f16.
    #[test]
    fn single_file_networks_equal_the_folders() {
        let device = Default::default();
        let file = fixture("sd_tiny_single/model.safetensors");
        check_single_file(&file).unwrap();
        let sd = fixture("sd_tiny");

        let (config, folder) = load_unet::<TestBackend>(sd.join("unet"), &device).unwrap();
        let map = ldm_unet_key_map(&config).unwrap();
        let unet = load_safetensors(config.init::<TestBackend>(&device).unwrap(), &file, &map).unwrap();
        same_weights(&unet, &folder, "unet");

        let (config, folder) = load_vae::<TestBackend>(sd.join("vae"), &device).unwrap();
        let vae = load_safetensors(
            config.init::<TestBackend>(&device).unwrap(),
            &file,
            &ldm_vae_key_map(&config),
        );
        same_weights(&vae.unwrap(), &folder, "vae");

        let (_, folder) = load_clip_text::<TestBackend>(sd.join("text_encoder"), &device).unwrap();
        let config: ClipTextConfig = read_config(sd.join("text_encoder/config.json")).unwrap();
        let clip = load_safetensors(config.init::<TestBackend>(&device).unwrap(), &file, &ldm_clip_key_map());
        same_weights(&clip.unwrap(), &folder, "text encoder");
    }

    /// SD 1.5's whole layout (from its configs; pairs of single-file and diffusers keys that
    /// diffusers' own conversion maps into each other, in sd15_keys.json): every single-file
    /// key lands where the diffusers key does, and none is ignored.
    #[test]
    fn sd15_layout_maps_onto_diffusers_keys() {
        let pairs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("sd_tiny_single/sd15_keys.json")).unwrap()).unwrap();
        let unet_config = UNet2DConditionConfig::sd15();
        let vae_config: AutoencoderKLConfig = serde_json::from_str(
            r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
        )
        .unwrap();
        for (network, ldm, ours) in [
            ("unet", ldm_unet_key_map(&unet_config).unwrap(), unet_key_map()),
            ("vae", ldm_vae_key_map(&vae_config), vae_key_map()),
        ] {
            let list = pairs[network].as_array().unwrap();
            assert!(list.len() > 200, "{network}");
            for pair in list {
                let (single, diffusers) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
                let got = ldm.renamed(single).unwrap();
                assert_eq!(got, ours.renamed(diffusers).unwrap(), "{network}: {single}");
                assert!(!ldm.is_ignored(&got).unwrap(), "{network}: {single} ignored");
            }
        }
    }

    /// A folder's weights file is not a single file; neither are SD 2.x's or SDXL's layouts,
    /// which are named.
    #[test]
    fn other_layouts_are_named() {
        let err = check_single_file(&fixture("sd_tiny/unet/diffusion_pytorch_model.safetensors")).unwrap_err();
        assert!(err.to_string().contains("model.diffusion_model"), "{err}");
        let dir = std::env::temp_dir().join(format!("adjoint-dpm-single-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (key, named) in [
            ("cond_stage_model.model.token_embedding.weight", "SD 2.x"),
            ("conditioner.embedders.1.model.positional_embedding", "SDXL"),
        ] {
            let path = dir.join("model.safetensors");
            let header = format!(r#"{{"{key}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#);
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            bytes.extend([0u8; 4]);
            std::fs::write(&path, bytes).unwrap();
            let err = check_single_file(&path).unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
