//! Fusing a LoRA checkpoint into a network's weights: `W ← W + s · (α/r) · B A` for every layer
//! the file adapts, as diffusers' `load_lora_weights` + `fuse_lora` do.
//!
//! Two key layouts are read, each under a component's prefix:
//! - diffusers/peft: `unet.<module path>.lora_A.weight` (A, `[r, in, …]`), `.lora_B.weight`
//!   (B, `[out, r, …]`), and the older `.lora.down.weight` / `.lora.up.weight`;
//! - kohya (sd-scripts, civitai): `lora_unet_<module path with _ for .>.lora_down.weight`,
//!   `.lora_up.weight`, and the scale's `.alpha`.
//!
//! Without `.alpha`, α is the `<peft>.lora_alpha` of the adapter config diffusers writes into
//! the file's metadata (`lora_adapter_metadata`), over its `<peft>.r`; without either, α = r.
//!
//! Module paths are diffusers' (as in its checkpoints); the component's [`KeyMap`] turns them
//! into ours. A kohya name is read back into a path by joining its words with dots, except
//! within the multi-word names the network and its key map use (`down_blocks`, `to_out`, …).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use burn_store::{ModuleSnapshot, ModuleStore, SafetensorsStore, TensorSnapshot};
use regex::Regex;

use crate::load::{read_safetensors_header, KeyMap, LoadError};

/// Where a component's keys sit in a LoRA file: diffusers/peft's prefix (`unet`,
/// `text_encoder`) and kohya's (`lora_unet`; `lora_te`, or SDXL's `lora_te1`).
#[derive(Debug, Clone, Copy)]
pub struct LoraPrefixes<'a> {
    /// diffusers/peft: keys `<peft>.<module path>.lora_A.weight`, ….
    pub peft: &'a str,
    /// kohya: keys `<kohya>_<module_path>.lora_down.weight`, …, under any of these.
    pub kohya: &'a [&'a str],
}

/// What [`fuse_lora`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraFused {
    /// Layers whose weights changed.
    pub layers: usize,
    /// The file's keys under neither prefix (another component's), left for its own call.
    pub other_keys: Vec<String>,
}

/// One adapted layer's tensors.
#[derive(Default)]
struct Pair {
    down: Option<TensorData>,
    up: Option<TensorData>,
    alpha: Option<f64>,
}

/// Fuses the LoRA checkpoint at `path` (safetensors) into `module`, scaled by `scale`
/// (diffusers' `lora_scale`): every layer under `prefixes` must exist in `module` with a
/// matching shape, and carry both its matrices, or nothing changes and the error names them.
pub fn fuse_lora<B: Backend, M: Module<B>>(
    mut module: M,
    path: impl AsRef<Path>,
    prefixes: LoraPrefixes,
    keys: &KeyMap,
    scale: f64,
) -> Result<(M, LoraFused), LoadError> {
    let path = path.as_ref();
    let bad = |message: String| LoadError::Lora {
        path: path.into(),
        message,
    };
    if !path.is_file() {
        return Err(bad("no such file".into()));
    }
    let mut store = SafetensorsStore::from_file(path);
    let file = store.get_all_snapshots().map_err(|e| LoadError::Corrupt {
        path: path.into(),
        format: "safetensors",
        message: e.to_string(),
    })?;
    let ours: BTreeMap<String, TensorSnapshot> = module
        .collect(None, None, true)
        .into_iter()
        .map(|s| (s.full_path(), s))
        .collect();
    let words = multi_word_names(ours.keys().map(String::as_str), keys);
    let config = adapter_config(path, prefixes.peft).map_err(bad)?;
    let renames: Vec<(Regex, String)> = keys
        .renames
        .iter()
        .map(|(p, to)| {
            Regex::new(p)
                .map(|r| (r, to.clone()))
                .map_err(|source| LoadError::Pattern {
                    pattern: p.clone(),
                    source,
                })
        })
        .collect::<Result<_, _>>()?;

    let peft = format!("{}.", prefixes.peft);
    let kohya: Vec<String> = prefixes.kohya.iter().map(|p| format!("{p}_")).collect();
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut fused = LoraFused::default();
    for (key, snapshot) in file.iter() {
        let parsed = if let Some(rest) = key.strip_prefix(&peft) {
            [
                ".lora_A.weight",
                ".lora.down.weight",
                ".lora_B.weight",
                ".lora.up.weight",
                ".alpha",
            ]
            .iter()
            .enumerate()
            .find_map(|(k, suffix)| rest.strip_suffix(suffix).map(|body| (body.to_string(), k / 2)))
        } else if let Some(rest) = kohya.iter().find_map(|p| key.strip_prefix(p.as_str())) {
            [".lora_down.weight", ".lora_up.weight", ".alpha"]
                .iter()
                .enumerate()
                .find_map(|(k, suffix)| rest.strip_suffix(suffix).map(|body| (dotted(body, &words), k)))
        } else {
            fused.other_keys.push(key.clone());
            continue;
        };
        let Some((body, part)) = parsed else {
            return Err(bad(format!("{key}: not a LoRA matrix or alpha")));
        };
        let data = snapshot.to_data().map_err(|e| bad(format!("{key}: {e}")))?;
        let pair = pairs.entry(body).or_default();
        match part {
            0 => pair.down = Some(data),
            1 => pair.up = Some(data),
            _ => {
                pair.alpha = data
                    .convert::<f64>()
                    .to_vec::<f64>()
                    .ok()
                    .and_then(|v| v.first().copied())
            }
        }
    }

    let device = module.devices().first().cloned().unwrap_or_default();
    let mut updated = Vec::new();
    let mut unknown = Vec::new();
    for (body, pair) in pairs {
        let mut target = format!("{body}.weight");
        for (pattern, to) in &renames {
            target = pattern.replace_all(&target, to.as_str()).into_owned();
        }
        let (Some(down), Some(up)) = (pair.down, pair.up) else {
            return Err(bad(format!("{body}: one of its two LoRA matrices is missing")));
        };
        let Some(weight) = ours.get(&target) else {
            unknown.push(body);
            continue;
        };
        let rank = down.shape[0];
        let factor = scale
            * match (pair.alpha, config) {
                (Some(alpha), _) => alpha / rank as f64,
                (None, Some((alpha, r))) => alpha / r,
                (None, None) => 1.0,
            };
        let w_shape = weight.shape.to_vec();
        let (d_in, d_out) = (down.shape[1..].iter().product::<usize>(), up.shape[0]);
        let flat = |data: TensorData, rows: usize, cols: usize| {
            let values = data.convert::<f64>().to_vec::<f64>().unwrap_or_default();
            Tensor::<B, 2>::from_data(TensorData::new(values, [rows, cols]), &device)
        };
        if up.shape.get(1) != Some(&rank) || up.shape[2..].iter().any(|&k| k != 1) {
            return Err(bad(format!(
                "{body}: its up matrix {:?} does not follow its down matrix {:?}",
                up.shape, down.shape
            )));
        }
        let fits = match w_shape.len() {
            2 => w_shape == [d_in, d_out],
            _ => w_shape[0] == d_out && w_shape[1..].iter().product::<usize>() == d_in,
        };
        if !fits {
            return Err(bad(format!(
                "{body}: its LoRA maps {d_in} to {d_out} values, the layer's weight ({target}) is {w_shape:?}"
            )));
        }
        // B A, `[out, in · kernel]` in PyTorch's layout; burn's linear weights are `[in, out]`.
        let delta = flat(up, d_out, rank).matmul(flat(down, rank, d_in)).mul_scalar(factor);
        let delta = match w_shape.len() {
            2 => delta.transpose(),
            _ => delta,
        };
        let delta = delta.into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default();
        let old = weight.to_data().map_err(|e| bad(format!("{target}: {e}")))?;
        let dtype = old.dtype;
        let old = old.convert::<f64>().to_vec::<f64>().unwrap_or_default();
        let sum: Vec<f64> = old.iter().zip(&delta).map(|(w, d)| w + d).collect();
        updated.push(TensorSnapshot::from_data(
            TensorData::new(sum, w_shape).convert_dtype(dtype),
            weight.path_stack.clone().unwrap_or_default(),
            weight.container_stack.clone().unwrap_or_default(),
            weight.tensor_id.unwrap_or_default(),
        ));
    }
    if !unknown.is_empty() {
        return Err(bad(format!(
            "{} LoRA layers name no layer of the network, e.g. {}",
            unknown.len(),
            unknown.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    fused.layers = updated.len();
    let result = module.apply(updated, None, None, true);
    if let Some(error) = result.errors.first() {
        return Err(bad(error.to_string()));
    }
    Ok((module, fused))
}

/// diffusers' adapter config for the component `prefix` from the safetensors header's
/// `lora_adapter_metadata`: `(lora_alpha, r)`, or `None` without one.
fn adapter_config(path: &Path, prefix: &str) -> Result<Option<(f64, f64)>, String> {
    let header = read_safetensors_header(path)?;
    let Some(raw) = header["__metadata__"]["lora_adapter_metadata"].as_str() else {
        return Ok(None);
    };
    let meta: serde_json::Value = serde_json::from_str(raw).map_err(|e| format!("lora_adapter_metadata: {e}"))?;
    let field = |name: &str| &meta[format!("{prefix}.{name}")];
    for pattern in ["alpha_pattern", "rank_pattern"] {
        if field(pattern).as_object().is_some_and(|m| !m.is_empty()) {
            return Err(format!(
                "its adapter config's {prefix}.{pattern} (per-layer values) is not supported"
            ));
        }
    }
    Ok(field("lora_alpha").as_f64().zip(field("r").as_f64()))
}

/// The multi-word names (`down_blocks`, `to_out`, `text_model`, …) of the network's paths and
/// of its key map's patterns, longest first, each as its words.
fn multi_word_names<'a>(paths: impl Iterator<Item = &'a str>, keys: &KeyMap) -> Vec<Vec<String>> {
    let word = Regex::new(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+").expect("a valid pattern");
    let mut names: HashSet<String> = HashSet::new();
    for path in paths {
        names.extend(path.split('.').filter(|s| s.contains('_')).map(str::to_string));
    }
    for (pattern, to) in &keys.renames {
        names.extend(word.find_iter(pattern).map(|m| m.as_str().to_string()));
        names.extend(word.find_iter(to).map(|m| m.as_str().to_string()));
    }
    let mut names: Vec<Vec<String>> = names
        .into_iter()
        .map(|n| n.split('_').map(str::to_string).collect())
        .collect();
    names.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    names
}

/// A kohya name's module path: its words joined by dots, but those of a known multi-word name
/// by underscores.
fn dotted(name: &str, words: &[Vec<String>]) -> String {
    let tokens: Vec<&str> = name.split('_').collect();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let known = words
            .iter()
            .find(|w| tokens.len() - i >= w.len() && w.iter().zip(&tokens[i..]).all(|(a, b)| a == b));
        match known {
            Some(w) => {
                parts.push(w.join("_"));
                i += w.len();
            }
            None => {
                parts.push(tokens[i].to_string());
                i += 1;
            }
        }
    }
    parts.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kohya names read back into paths: the network's multi-word names and the key map's
    /// (`to_out`, only in its pattern) keep their underscores, every other underscore is a dot.
    #[test]
    fn kohya_names_read_back_into_module_paths() {
        let keys = KeyMap::new().rename(r"\.to_out\.0\.", ".to_out.");
        let paths = [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.0.resnets.0.time_emb_proj.weight",
        ];
        let words = multi_word_names(paths.into_iter(), &keys);
        let read = |name: &str| dotted(name, &words);
        assert_eq!(
            read("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
        );
        assert_eq!(
            read("down_blocks_0_resnets_0_time_emb_proj"),
            "down_blocks.0.resnets.0.time_emb_proj"
        );
        // A name the network does not have stays dotted (and then matches no layer).
        assert_eq!(read("mid_block_foo_bar"), "mid.block.foo.bar");
    }
}
