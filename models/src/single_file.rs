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

use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, TensorData};
use burn_store::{TensorSnapshot, TensorSnapshotError};
use regex::Regex;

use crate::clip::{clip_key_map, ClipTextModel};
use crate::controlnet::ControlNetConfig;
use crate::load::{load_snapshots, read_safetensors, read_safetensors_header, KeyMap, LoadError};
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

/// The key map of a single file's CLIP text encoder into [`crate::clip::ClipTextModel`]: SD
/// 1.x's (`cond_stage_model.transformer.…`), or SDXL's first ([`SDXL_CLIP`]) for `sdxl`.
pub fn ldm_clip_key_map(sdxl: bool) -> KeyMap {
    let prefix = match sdxl {
        true => regex::escape(SDXL_CLIP),
        false => PREFIXES[2].to_string(),
    };
    let map = KeyMap::new().rename(&format!("^{prefix}"), "").then(clip_key_map());
    ignore_others(map, PREFIXES[2])
}

/// A ControlNet in one file, in the original layout (lllyasviel's `control_v11*_sd15_*.pth`
/// as safetensors, ComfyUI's `*_fp16.safetensors`): its copy of the UNet's input path numbered
/// as the UNet's, under `control_model.` or no prefix. Its config is the base UNet's input path
/// (`unet`, the pipeline's UNet config) with the conditioning embedding read from the file's
/// `input_hint_block` shapes. Returns the config and its key map.
pub fn ldm_controlnet(path: &Path, unet: &UNet2DConditionConfig) -> Result<(ControlNetConfig, KeyMap), LoadError> {
    let bad = |message: String| LoadError::Corrupt {
        path: path.into(),
        format: "ControlNet safetensors",
        message,
    };
    let header = read_safetensors_header(path).map_err(bad)?;
    let prefix = if header.get("control_model.input_hint_block.0.weight").is_some() {
        "control_model."
    } else {
        ""
    };
    // input_hint_block.{k}: conv_in at 0, then pairs of (3×3, strided) convolutions at 2, 4, …,
    // conv_out at the highest index (14 after SD's three stages).
    let mut hint: Vec<(usize, Vec<usize>)> = Vec::new();
    for (key, entry) in header.as_object().into_iter().flatten() {
        let Some(k) = key
            .strip_prefix(prefix)
            .and_then(|k| k.strip_prefix("input_hint_block."))
            .and_then(|k| k.strip_suffix(".weight"))
            .and_then(|k| k.parse::<usize>().ok())
        else {
            continue;
        };
        let shape = entry["shape"]
            .as_array()
            .map(|dims| dims.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect())
            .unwrap_or_default();
        hint.push((k, shape));
    }
    hint.sort();
    let convs = hint.len();
    if convs < 2 || !convs.is_multiple_of(2) || hint.iter().any(|(_, shape)| shape.len() != 4) {
        return Err(LoadError::Unsupported(format!(
            "{}: not a ControlNet file in the original layout (its conditioning embedding, \
             input_hint_block.*, has {convs} convolutions)",
            path.display()
        )));
    }
    let (conv_out, _) = hint[convs - 1];
    let mut stages = vec![hint[0].1[0]];
    stages.extend(hint[1..convs - 1].iter().skip(1).step_by(2).map(|(_, shape)| shape[0]));
    let config = ControlNetConfig {
        unet: unet.clone(),
        conditioning_channels: hint[0].1[1],
        conditioning_embedding_out_channels: stages,
        controlnet_conditioning_channel_order: "rgb".into(),
        global_pool_conditions: false,
    };
    // Into the UNet's single-file names, then the UNet's map; the ControlNet's own parts first.
    let p = regex::escape(prefix);
    let mut map = KeyMap::new()
        .rename(
            &format!(r"^{p}input_hint_block\.0\."),
            "controlnet_cond_embedding.conv_in.",
        )
        .rename(
            &format!(r"^{p}input_hint_block\.{conv_out}\."),
            "controlnet_cond_embedding.conv_out.",
        );
    for (j, (k, _)) in hint[1..convs - 1].iter().enumerate() {
        map = map.rename(
            &format!(r"^{p}input_hint_block\.{k}\."),
            &format!("controlnet_cond_embedding.blocks.{j}."),
        );
    }
    let map = map
        .rename(&format!(r"^{p}zero_convs\.(\d+)\.0\."), "controlnet_down_blocks.${1}.")
        .rename(&format!(r"^{p}middle_block_out\.0\."), "controlnet_mid_block.")
        .rename(
            &format!(r"^{p}(time_embed|input_blocks|middle_block|label_emb)\."),
            "model.diffusion_model.${1}.",
        )
        .then(ldm_unet_key_map(unet)?);
    Ok((config, map))
}

/// The prefix of the OpenCLIP text encoder of an SD 2.x single file.
pub const SD2_OPEN_CLIP: &str = "cond_stage_model.model.";
/// The prefix of SDXL's second (OpenCLIP) text encoder in a single file.
pub const SDXL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";
/// The prefix of SDXL's first (CLIP-L) text encoder in a single file.
pub const SDXL_CLIP: &str = "conditioner.embedders.0.transformer.";

/// Loads the OpenCLIP text encoder under `prefix` of the single file at `path` (SD 2.x's
/// [`SD2_OPEN_CLIP`], SDXL's [`SDXL_OPEN_CLIP`]) into `module`, a transformers-layout CLIP of
/// its config: `attn.in_proj` is split into q, k and v, `text_projection` (the matrix `x P`)
/// becomes the projection's weight, and the layers past the config's (SD 2.x conditions on the
/// penultimate one, which diffusers' config keeps as the last) are left out, as is the
/// projection of a model without one.
pub fn load_open_clip<B: Backend>(
    module: ClipTextModel<B>,
    path: &Path,
    prefix: &str,
) -> Result<ClipTextModel<B>, LoadError> {
    let layers = module.encoder.layers.len();
    let projected = module.text_projection.is_some();
    let block =
        Regex::new(&format!(r"^{}transformer\.resblocks\.(\d+)\.", regex::escape(prefix))).map_err(|source| {
            LoadError::Pattern {
                pattern: prefix.into(),
                source,
            }
        })?;
    let mut snapshots = Vec::new();
    for snapshot in read_safetensors(path)? {
        let key = snapshot.full_path();
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        if let Some(index) = block.captures(&key).and_then(|c| c[1].parse::<usize>().ok()) {
            if index >= layers {
                continue;
            }
        }
        if rest == "text_projection" {
            if projected {
                snapshots.push(transposed(&snapshot, format!("{prefix}text_projection.weight"))?);
            }
            continue;
        }
        match rest
            .strip_suffix("in_proj_weight")
            .or_else(|| rest.strip_suffix("in_proj_bias"))
        {
            Some(stem) => {
                let kind = if rest.ends_with("weight") { "weight" } else { "bias" };
                for (i, qkv) in ["q", "k", "v"].into_iter().enumerate() {
                    snapshots.push(third(&snapshot, i, format!("{prefix}{stem}{qkv}_proj.{kind}"))?);
                }
            }
            None => snapshots.push(snapshot),
        }
    }
    let p = regex::escape(prefix);
    let map = KeyMap::new()
        .rename(&format!(r"^{p}token_embedding\."), "embeddings.token_embedding.")
        .rename(
            &format!(r"^{p}positional_embedding$"),
            "embeddings.position_embedding.weight",
        )
        .rename(&format!(r"^{p}ln_final\."), "final_layer_norm.")
        .rename(&format!(r"^{p}text_projection\."), "text_projection.")
        .rename(&format!(r"^{p}transformer\.resblocks\.(\d+)\."), "encoder.layers.${1}.")
        .rename(r"^(encoder\.layers\.\d+)\.ln_1\.", "${1}.layer_norm1.")
        .rename(r"^(encoder\.layers\.\d+)\.ln_2\.", "${1}.layer_norm2.")
        .rename(r"^(encoder\.layers\.\d+)\.mlp\.c_fc\.", "${1}.mlp.fc1.")
        .rename(r"^(encoder\.layers\.\d+)\.mlp\.c_proj\.", "${1}.mlp.fc2.")
        .rename(r"^(encoder\.layers\.\d+)\.attn\.", "${1}.self_attn.")
        .then(clip_key_map());
    load_snapshots(module, snapshots, path, &map)
}

/// A snapshot's data as f32 values with its shape.
fn values_of(snapshot: &TensorSnapshot) -> Result<(Vec<f32>, Vec<usize>), TensorSnapshotError> {
    let data = snapshot.to_data()?.convert_dtype(DType::F32);
    let shape = data.shape.to_vec();
    let values = data
        .to_vec::<f32>()
        .map_err(|e| TensorSnapshotError::DataError(format!("{e:?}")))?;
    Ok((values, shape))
}

/// A new snapshot at `path` whose data `make` computes from `source`'s, of shape `shape`.
fn derived(
    source: &TensorSnapshot,
    path: String,
    shape: Vec<usize>,
    make: impl Fn(Vec<f32>, &[usize]) -> Vec<f32> + 'static,
) -> TensorSnapshot {
    let source = source.clone();
    let target = shape.clone();
    TensorSnapshot::from_closure(
        std::rc::Rc::new(move || {
            let (values, shape) = values_of(&source)?;
            Ok(TensorData::new(make(values, &shape), target.clone()))
        }),
        DType::F32,
        shape.into(),
        path.split('.').map(String::from).collect(),
        Vec::new(),
        ParamId::new(),
    )
}

/// The `i`-th third (along the first axis) of a fused `[3d, …]` q/k/v tensor.
fn third(snapshot: &TensorSnapshot, i: usize, path: String) -> Result<TensorSnapshot, LoadError> {
    let mut shape = snapshot.shape.to_vec();
    if shape.is_empty() || !shape[0].is_multiple_of(3) {
        return Err(LoadError::Unsupported(format!(
            "{}: a fused q/k/v tensor of shape {shape:?}",
            snapshot.full_path()
        )));
    }
    shape[0] /= 3;
    let size: usize = shape.iter().product();
    Ok(derived(snapshot, path, shape, move |values, _| {
        values[i * size..(i + 1) * size].to_vec()
    }))
}

/// A `[a, b]` matrix as `[b, a]`.
fn transposed(snapshot: &TensorSnapshot, path: String) -> Result<TensorSnapshot, LoadError> {
    let shape = snapshot.shape.to_vec();
    let [a, b] = shape[..] else {
        return Err(LoadError::Unsupported(format!(
            "{}: a text projection of shape {shape:?}",
            snapshot.full_path()
        )));
    };
    Ok(derived(snapshot, path, vec![b, a], move |values, _| {
        (0..b * a).map(|k| values[(k % a) * b + k / a]).collect()
    }))
}

/// Which Stable Diffusion a single file holds, told by its text encoders' keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingleFileLayout {
    /// SD 1.x: CLIP under `cond_stage_model.transformer.`.
    Sd1,
    /// SD 2.x: OpenCLIP under [`SD2_OPEN_CLIP`].
    Sd2,
    /// SDXL: CLIP-L under [`SDXL_CLIP`] and OpenCLIP under [`SDXL_OPEN_CLIP`].
    Sdxl,
}

/// The layout of the single file at `path`, from its header alone (the tensors are not read).
pub fn single_file_layout(path: &Path) -> Result<SingleFileLayout, LoadError> {
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
    if !has("model.diffusion_model.") {
        return Err(corrupt(
            "no model.diffusion_model.* keys: not a single-file Stable Diffusion checkpoint".into(),
        ));
    }
    match (
        has(SDXL_OPEN_CLIP),
        has(SD2_OPEN_CLIP),
        has("cond_stage_model.transformer."),
    ) {
        (true, _, _) => Ok(SingleFileLayout::Sdxl),
        (_, true, _) => Ok(SingleFileLayout::Sd2),
        (_, _, true) => Ok(SingleFileLayout::Sd1),
        _ => Err(corrupt(
            "no text encoder (cond_stage_model.transformer.*, cond_stage_model.model.* or conditioner.embedders.*)"
                .into(),
        )),
    }
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
        assert_eq!(single_file_layout(&file).unwrap(), SingleFileLayout::Sd1);
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
        let clip = load_safetensors(
            config.init::<TestBackend>(&device).unwrap(),
            &file,
            &ldm_clip_key_map(false),
        );
        same_weights(&clip.unwrap(), &folder, "text encoder");
    }

    /// A ControlNet in the original layout (controlnet_tiny's, written by the fixture script
    /// and read back by diffusers' ControlNetModel.from_single_file) equals the folder's, its
    /// config derived from sd_tiny's UNet and the file's conditioning embedding.
    #[test]
    fn controlnet_single_file_equals_the_folders() {
        use crate::controlnet::load_controlnet;
        let device = Default::default();
        let file = fixture("sd_tiny_single/controlnet.safetensors");
        let (unet_config, _) = load_unet::<TestBackend>(fixture("sd_tiny/unet"), &device).unwrap();
        let (config, map) = ldm_controlnet(&file, &unet_config).unwrap();
        let (folder_config, folder) =
            load_controlnet::<TestBackend>(fixture("controlnet_tiny/controlnet"), &device).unwrap();
        assert_eq!(
            config.conditioning_embedding_out_channels,
            folder_config.conditioning_embedding_out_channels
        );
        let ours = load_safetensors(config.init::<TestBackend>(&device).unwrap(), &file, &map).unwrap();
        same_weights(&ours, &folder, "controlnet");
        // A file of another network is not taken for a ControlNet.
        let other = fixture("sd_tiny_single/model.safetensors");
        let err = ldm_controlnet(&other, &unet_config).unwrap_err();
        assert!(err.to_string().contains("input_hint_block"), "{err}");
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

    /// SD 2.x's text encoder (sd_tiny's in OpenCLIP's layout, which diffusers'
    /// convert_open_clip_checkpoint reads back to it) equals the folder's; a folder's weights
    /// file is not a single file, nor is one without a text encoder.
    #[test]
    fn open_clip_text_encoders_and_other_files() {
        let device = Default::default();
        let sd = fixture("sd_tiny");
        let (config, folder) = load_clip_text::<TestBackend>(sd.join("text_encoder"), &device).unwrap();
        let file = fixture("sd_tiny_single/sd2_text_encoder.safetensors");
        let clip = load_open_clip(config.init::<TestBackend>(&device).unwrap(), &file, SD2_OPEN_CLIP).unwrap();
        same_weights(&clip, &folder, "SD 2.x text encoder");
        let err = single_file_layout(&file).unwrap_err();
        assert!(err.to_string().contains("model.diffusion_model"), "{err}");
        let err = single_file_layout(&fixture("sd_tiny/unet/diffusion_pytorch_model.safetensors")).unwrap_err();
        assert!(err.to_string().contains("model.diffusion_model"), "{err}");
        let dir = std::env::temp_dir().join(format!("adjoint-dpm-single-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let header = r#"{"model.diffusion_model.out.2.bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 4]);
        std::fs::write(&path, bytes).unwrap();
        let err = single_file_layout(&path).unwrap_err();
        assert!(err.to_string().contains("no text encoder"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
