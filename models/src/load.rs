//! Weight loading: a checkpoint's key tree into our module tree, through burn-store.
//!
//! Our modules name their fields after the reference checkpoint keys (DESIGN.md §4), so loading
//! is a short rename table ([`KeyMap`]) plus burn-store's PyTorch adapter, which transposes
//! `Linear` weights (PyTorch stores `[out, in]`, burn `[in, out]`) and maps norm `weight`/`bias`
//! to burn's `gamma`/`beta`. Half-precision checkpoints (`f16`, `bf16`) are converted on load to
//! the device's float dtype.
//!
//! Every problem is a [`LoadError`], never a panic: an unreadable, corrupt or truncated file, and
//! a key tree that does not match (missing, unused or mis-shaped keys, listed in a [`LoadReport`]
//! with "did you mean" hints, as burn-store's `ApplyResult` does).

use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, TensorData};
use burn_store::{
    KeyRemapper, ModuleAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
    TensorSnapshot,
};
use regex::Regex;

/// How many keys an error message lists before it only gives the count.
const LISTED_KEYS: usize = 8;

/// Why a checkpoint or config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The weights could not be written (or moved into place).
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The OS or serialisation error.
        source: std::io::Error,
    },
    /// The file is not a valid checkpoint (bad header, truncated data, unknown dtype...).
    #[error("{path} is not a valid {format} checkpoint (corrupt or truncated?): {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// `safetensors` or `pytorch`.
        format: &'static str,
        /// What the reader reported.
        message: String,
    },
    /// The checkpoint's keys do not match the module: see the report.
    #[error("{path} does not match the module:\n{report}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Missing, unused and mis-shaped keys.
        report: Box<LoadReport>,
    },
    /// A config.json could not be parsed into the network's config.
    #[error("cannot parse config {path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The serde error (it names the field and line).
        source: serde_json::Error,
    },
    /// The config parses but asks for something this crate does not implement.
    #[error("unsupported config: {0}")]
    Unsupported(String),
    /// A LoRA checkpoint that does not fit the network.
    #[error("{path}: {message}")]
    Lora {
        /// The file.
        path: PathBuf,
        /// What does not fit, naming the layers.
        message: String,
    },
    /// A rename or ignore pattern of a [`KeyMap`] is not a valid regex (a bug in this crate).
    #[error("invalid key pattern {pattern:?}: {source}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// The regex error.
        source: regex::Error,
    },
    /// No weights file was found in a model directory.
    #[error("no weights in {dir}: looked for {candidates:?}")]
    NoWeights {
        /// The directory.
        dir: PathBuf,
        /// The file names tried, in order.
        candidates: Vec<String>,
    },
}

/// A key that exists on both sides with different shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// Our module path (after renaming).
    pub key: String,
    /// Shape our module expects (burn layout: `Linear` weights are `[in, out]`).
    pub expected: Vec<usize>,
    /// Shape found in the checkpoint (in the same layout).
    pub found: Vec<usize>,
}

/// The outcome of matching a checkpoint against a module, as burn-store's `ApplyResult`.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Number of tensors loaded.
    pub applied: usize,
    /// Module parameters with no key in the checkpoint (with a "did you mean" key, if any).
    pub missing: Vec<(String, Option<String>)>,
    /// Checkpoint keys no parameter asked for (after renaming, ignoring [`KeyMap::ignore`]).
    pub unused: Vec<String>,
    /// Keys found on both sides with different shapes.
    pub mismatched: Vec<ShapeMismatch>,
    /// Tensors whose data could not be read (corrupt payload, unsupported dtype).
    pub unreadable: Vec<(String, String)>,
}

impl LoadReport {
    /// True when every parameter was loaded and every checkpoint key was used.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.unused.is_empty() && self.mismatched.is_empty() && self.unreadable.is_empty()
    }
}

fn write_list<T>(f: &mut fmt::Formatter<'_>, title: &str, items: &[T], show: impl Fn(&T) -> String) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    writeln!(f, "  {} {title}:", items.len())?;
    for item in items.iter().take(LISTED_KEYS) {
        writeln!(f, "    {}", show(item))?;
    }
    if items.len() > LISTED_KEYS {
        writeln!(f, "    ... and {} more", items.len() - LISTED_KEYS)?;
    }
    Ok(())
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  {} tensors loaded", self.applied)?;
        write_list(
            f,
            "missing from the checkpoint",
            &self.missing,
            |(k, hint)| match hint {
                Some(h) => format!("{k}  (did you mean '{h}'?)"),
                None => k.clone(),
            },
        )?;
        write_list(f, "unused checkpoint keys", &self.unused, |k| k.clone())?;
        write_list(f, "mis-shaped", &self.mismatched, |m| {
            format!("{}: expected {:?}, found {:?}", m.key, m.expected, m.found)
        })?;
        write_list(f, "unreadable", &self.unreadable, |(k, e)| format!("{k}: {e}"))
    }
}

/// The rename table from a checkpoint's keys to our module paths.
///
/// Renames are regexes applied in order to every checkpoint key (e.g. `\.to_out\.0\.` →
/// `.to_out.`); ignored keys (e.g. BatchNorm's `num_batches_tracked`) are checkpoint entries the
/// network deliberately does not hold, so they are not reported as unused.
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    /// `(pattern, replacement)` pairs, applied in order; replacements may use `$1` captures.
    pub renames: Vec<(String, String)>,
    /// Patterns of checkpoint keys (after renaming) that are expected to stay unused.
    pub ignore: Vec<String>,
    /// Patterns of checkpoint keys (after renaming) whose `[out, in, 1, 1]` tensors load into
    /// linear layers as `[out, in]` (the original Stable Diffusion VAE's attention projections
    /// are 1×1 convolutions).
    pub squeeze: Vec<String>,
}

impl KeyMap {
    /// An empty map: checkpoint keys are module paths.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rename rule.
    pub fn rename(mut self, pattern: &str, replacement: &str) -> Self {
        self.renames.push((pattern.into(), replacement.into()));
        self
    }

    /// Adds a pattern of checkpoint keys to leave unused without complaint.
    pub fn ignore(mut self, pattern: &str) -> Self {
        self.ignore.push(pattern.into());
        self
    }

    /// Adds a pattern of keys whose trailing 1×1 dimensions are dropped on load.
    pub fn squeeze(mut self, pattern: &str) -> Self {
        self.squeeze.push(pattern.into());
        self
    }

    /// The same map followed by `other`'s renames, ignores and squeezes.
    pub fn then(mut self, other: KeyMap) -> Self {
        self.renames.extend(other.renames);
        self.ignore.extend(other.ignore);
        self.squeeze.extend(other.squeeze);
        self
    }

    /// The module path `key` is renamed to (the renames applied in order, as on load).
    pub fn renamed(&self, key: &str) -> Result<String, LoadError> {
        let mut key = key.to_string();
        for (pattern, to) in &self.renames {
            let regex = Regex::new(pattern).map_err(|source| LoadError::Pattern {
                pattern: pattern.clone(),
                source,
            })?;
            key = regex.replace_all(&key, to.as_str()).into_owned();
        }
        Ok(key)
    }

    /// Whether a (renamed) key is one the map leaves unused on purpose.
    pub fn is_ignored(&self, key: &str) -> Result<bool, LoadError> {
        Ok(self.ignored()?.iter().any(|r| r.is_match(key)))
    }

    fn remapper(&self) -> Result<KeyRemapper, LoadError> {
        let mut remapper = KeyRemapper::new();
        for (pattern, to) in &self.renames {
            remapper = remapper
                .add_pattern(pattern, to.clone())
                .map_err(|source| LoadError::Pattern {
                    pattern: pattern.clone(),
                    source,
                })?;
        }
        Ok(remapper)
    }

    fn ignored(&self) -> Result<Vec<Regex>, LoadError> {
        Self::compile(&self.ignore)
    }

    fn compile(patterns: &[String]) -> Result<Vec<Regex>, LoadError> {
        patterns
            .iter()
            .map(|p| {
                Regex::new(p).map_err(|source| LoadError::Pattern {
                    pattern: p.clone(),
                    source,
                })
            })
            .collect()
    }
}

/// Converts every floating-point tensor to one dtype (the device's float dtype), so that f16,
/// bf16 and f64 checkpoints load into f32 modules (burn-store would otherwise keep the file's).
#[derive(Debug, Clone)]
pub struct CastFloat {
    /// The dtype every float tensor is converted to.
    pub to: DType,
}

impl ModuleAdapter for CastFloat {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let is_float = matches!(snapshot.dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64);
        if !is_float || snapshot.dtype == self.to {
            return snapshot.clone();
        }
        let data_fn = snapshot.clone_data_fn();
        let to = self.to;
        TensorSnapshot::from_closure(
            std::rc::Rc::new(move || data_fn().map(|d: TensorData| d.convert_dtype(to))),
            to,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Loads a `.safetensors` checkpoint into `module`, renaming keys with `keys`.
///
/// Returns the module with its parameters replaced, or an error listing every mismatch; the
/// checkpoint must cover the module exactly (up to [`KeyMap::ignore`]).
pub fn load_safetensors<B: Backend, M: Module<B>>(
    module: M,
    path: impl AsRef<Path>,
    keys: &KeyMap,
) -> Result<M, LoadError> {
    let path = path.as_ref();
    load_snapshots(module, read_safetensors(path)?, path, keys)
}

/// The tensors of a `.safetensors` file as burn-store snapshots, their data read when used:
/// for checkpoints whose tensors need more than renaming ([`load_snapshots`]).
pub fn read_safetensors(path: &Path) -> Result<Vec<TensorSnapshot>, LoadError> {
    check_readable(path)?;
    let mut store = SafetensorsStore::from_file(path);
    Ok(store
        .get_all_snapshots()
        .map_err(|e| LoadError::Corrupt {
            path: path.into(),
            format: "safetensors",
            message: e.to_string(),
        })?
        .values()
        .cloned()
        .collect())
}

/// The file names diffusers saves a model's weights under, f32 first.
pub const DIFFUSERS_WEIGHTS: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];

/// A diffusers model folder (`config.json` and [`DIFFUSERS_WEIGHTS`]): its config, and the
/// model `init` builds from it with the weights loaded through `keys`.
pub fn load_diffusers_dir<C: serde::de::DeserializeOwned, B: Backend, M: Module<B>>(
    dir: &Path,
    init: impl FnOnce(&C) -> Result<M, LoadError>,
    keys: &KeyMap,
) -> Result<(C, M), LoadError> {
    let config: C = read_config(dir.join("config.json"))?;
    let model = init(&config)?;
    let weights = find_weights(dir, &DIFFUSERS_WEIGHTS)?;
    let model = load_safetensors(model, weights, keys)?;
    Ok((config, model))
}

/// The tensors of a PyTorch pickle (`.pth`, `.bin`) as burn-store snapshots, from the nested
/// dict `top_level_key` if given.
pub fn read_pytorch(path: &Path, top_level_key: Option<&str>) -> Result<Vec<TensorSnapshot>, LoadError> {
    check_readable(path)?;
    let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
    if let Some(key) = top_level_key {
        store = store.with_top_level_key(key);
    }
    Ok(store
        .get_all_snapshots()
        .map_err(|e| LoadError::Corrupt {
            path: path.into(),
            format: "pytorch",
            message: e.to_string(),
        })?
        .values()
        .cloned()
        .collect())
}

/// [`load_safetensors`] from snapshots already read from `path` (and reshaped or split).
pub fn load_snapshots<B: Backend, M: Module<B>>(
    module: M,
    snapshots: Vec<TensorSnapshot>,
    path: &Path,
    keys: &KeyMap,
) -> Result<M, LoadError> {
    apply(module, snapshots, path, keys)
}

/// Loads a PyTorch `.pth`/`.pt` state dict (torchvision's format) into `module`.
///
/// `top_level_key` selects a nested dict such as `"state_dict"`; `None` for a plain state dict.
pub fn load_pytorch<B: Backend, M: Module<B>>(
    module: M,
    path: impl AsRef<Path>,
    top_level_key: Option<&str>,
    keys: &KeyMap,
) -> Result<M, LoadError> {
    let path = path.as_ref();
    let snapshots = read_pytorch(path, top_level_key)?;
    apply(module, snapshots, path, keys)
}

/// Saves `module` as safetensors in our own key layout (for models trained with this crate):
/// PyTorch tensor layout and norm names, no enum variant names, our field names where they
/// differ from the reference (`to_out`, not `to_out.0`). [`load_safetensors`] with an empty
/// [`KeyMap`] reads it back.
///
/// The write is atomic: the weights go to a hidden sibling file that is renamed over `path` once
/// complete, so an interrupted save leaves the previous file (or none), never a truncated one.
pub fn save_safetensors<B: Backend, M: Module<B>>(module: &M, path: impl AsRef<Path>) -> Result<(), LoadError> {
    let path = path.as_ref();
    let tmp = tmp_sibling(path);
    let write_error = |source| LoadError::Write {
        path: path.into(),
        source,
    };
    let mut store = SafetensorsStore::from_file(&tmp)
        .with_to_adapter(burn_store::BurnToPyTorchAdapter)
        .skip_enum_variants(true)
        .overwrite(true);
    let result = module
        .save_into(&mut store)
        .map_err(|e| write_error(std::io::Error::other(e.to_string())))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(write_error));
    if result.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    result
}

/// A hidden temporary sibling of `path` (`.name.tmp-<pid>`), for writes that rename into place
/// once complete.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Reads and parses a JSON config (diffusers' or transformers' config.json).
pub fn read_config<C: serde::de::DeserializeOwned>(path: impl AsRef<Path>) -> Result<C, LoadError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Config {
        path: path.into(),
        source,
    })
}

/// Finds the first existing file among `candidates` in `dir` (e.g. the fp32 weights before the
/// `.fp16` variant).
pub fn find_weights(dir: impl AsRef<Path>, candidates: &[&str]) -> Result<PathBuf, LoadError> {
    let dir = dir.as_ref();
    candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.is_file())
        .ok_or_else(|| LoadError::NoWeights {
            dir: dir.into(),
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
        })
}

/// The JSON header of a `.safetensors` file (tensor names, dtypes and shapes, and
/// `__metadata__`), read without the tensors; the error says what is wrong with the file.
pub fn read_safetensors_header(path: &Path) -> Result<serde_json::Value, String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| format!("no safetensors header: {e}"))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(format!("a safetensors header of {len} bytes"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("a truncated safetensors header: {e}"))?;
    serde_json::from_slice(&header).map_err(|e| e.to_string())
}

fn check_readable(path: &Path) -> Result<(), LoadError> {
    std::fs::metadata(path).map(|_| ()).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })
}

fn apply<B: Backend, M: Module<B>>(
    mut module: M,
    snapshots: Vec<TensorSnapshot>,
    path: &Path,
    keys: &KeyMap,
) -> Result<M, LoadError> {
    let (snapshots, _) = keys.remapper()?.remap(snapshots);
    let squeezed = KeyMap::compile(&keys.squeeze)?;
    let snapshots = snapshots
        .into_iter()
        .map(
            |snapshot| match squeezed.iter().any(|r| r.is_match(&snapshot.full_path())) {
                true => squeeze_1x1(snapshot),
                false => snapshot,
            },
        )
        .collect();
    let ignored = keys.ignored()?;
    let dtype: DType = match module.devices().first() {
        Some(device) => burn::tensor::get_device_settings::<B>(device).float_dtype.into(),
        None => DType::F32,
    };
    let adapter = PyTorchToBurnAdapter.chain(CastFloat { to: dtype });
    let result = module.apply(snapshots, None, Some(Box::new(adapter)), true);

    let applied: std::collections::HashSet<&str> = result.applied.iter().map(String::as_str).collect();
    // burn-store looks norm `gamma`/`beta` up under PyTorch's `weight`/`bias` but still lists
    // the PyTorch key as unused; drop those, and the keys the network ignores on purpose.
    let unused: Vec<String> = result
        .unused
        .iter()
        .filter(|k| !ignored.iter().any(|r| r.is_match(k)))
        .filter(|k| {
            let burn_name = k
                .strip_suffix(".weight")
                .map(|p| format!("{p}.gamma"))
                .or_else(|| k.strip_suffix(".bias").map(|p| format!("{p}.beta")));
            !burn_name.is_some_and(|n| applied.contains(n.as_str()))
        })
        .cloned()
        .collect();
    let mut mismatched = Vec::new();
    let mut unreadable = Vec::new();
    for error in &result.errors {
        match error {
            burn_store::ApplyError::ShapeMismatch { path, expected, found } => mismatched.push(ShapeMismatch {
                key: path.clone(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            }),
            other => unreadable.push((error_path(other), other.to_string())),
        }
    }
    let missing = result
        .missing
        .iter()
        .map(|(k, _)| (k.clone(), did_you_mean(k, &unused)))
        .collect();
    let report = LoadReport {
        applied: result.applied.len(),
        missing,
        unused,
        mismatched,
        unreadable,
    };
    if report.is_complete() {
        Ok(module)
    } else {
        Err(LoadError::Mismatch {
            path: path.into(),
            report: Box::new(report),
        })
    }
}

/// A `[out, in, 1, 1]` tensor as `[out, in]`; any other shape unchanged (then reported as
/// mis-shaped if it does not fit).
fn squeeze_1x1(snapshot: TensorSnapshot) -> TensorSnapshot {
    let shape = snapshot.shape.to_vec();
    if shape.len() != 4 || shape[2..] != [1, 1] {
        return snapshot;
    }
    let data_fn = snapshot.clone_data_fn();
    let squeezed = vec![shape[0], shape[1]];
    let target = squeezed.clone();
    TensorSnapshot::from_closure(
        std::rc::Rc::new(move || {
            data_fn().map(|mut d: TensorData| {
                d.shape = target.clone().into();
                d
            })
        }),
        snapshot.dtype,
        squeezed.into(),
        snapshot.path_stack.clone().unwrap_or_default(),
        snapshot.container_stack.clone().unwrap_or_default(),
        snapshot.tensor_id.unwrap_or_default(),
    )
}

fn error_path(error: &burn_store::ApplyError) -> String {
    match error {
        burn_store::ApplyError::ShapeMismatch { path, .. }
        | burn_store::ApplyError::DTypeMismatch { path, .. }
        | burn_store::ApplyError::AdapterError { path, .. }
        | burn_store::ApplyError::LoadError { path, .. } => path.clone(),
    }
}

/// The unused key sharing the longest common prefix and the same last segment, if any.
fn did_you_mean(missing: &str, unused: &[String]) -> Option<String> {
    let leaf = missing.rsplit('.').next()?;
    let alt_leaf = match leaf {
        "gamma" => "weight",
        "beta" => "bias",
        other => other,
    };
    unused
        .iter()
        .filter(|u| u.ends_with(&format!(".{alt_leaf}")) || u.as_str() == alt_leaf)
        .map(|u| {
            let common = missing.bytes().zip(u.bytes()).take_while(|(a, b)| a == b).count();
            (common, u)
        })
        .max_by_key(|(common, _)| *common)
        .filter(|(common, _)| *common > 0)
        .map(|(_, u)| u.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, TestBackend};
    use crate::unet::{unet_key_map, UNet2DConditionConfig, UNet2DConditionModel};

    fn tiny_unet(config_dir: &str) -> (UNet2DConditionConfig, UNet2DConditionModel<TestBackend>) {
        let config: UNet2DConditionConfig = read_config(fixture(&format!("{config_dir}/config.json"))).unwrap();
        let model = config.init(&Default::default()).unwrap();
        (config, model)
    }

    fn weights() -> PathBuf {
        fixture("unet_tiny/diffusion_pytorch_model.safetensors")
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("adjoint-dpm-models-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn truncated_or_garbage_file_is_an_error_not_a_panic() {
        let bytes = std::fs::read(weights()).unwrap();
        for (name, content) in [
            ("truncated.safetensors", &bytes[..bytes.len() / 2]),
            ("header-only.safetensors", &bytes[..100]),
            ("garbage.safetensors", &b"this is not a checkpoint at all"[..]),
            ("empty.safetensors", &b""[..]),
        ] {
            let path = temp_file(name, content);
            let err = load_safetensors(tiny_unet("unet_tiny").1, &path, &unet_key_map()).unwrap_err();
            std::fs::remove_file(&path).ok();
            assert!(matches!(err, LoadError::Corrupt { .. }), "{name}: {err}");
        }
        let path = temp_file("garbage.pth", b"PK\x03\x04 not really a zip");
        let err = load_pytorch(tiny_unet("unet_tiny").1, &path, None, &unet_key_map()).unwrap_err();
        std::fs::remove_file(&path).ok();
        assert!(matches!(err, LoadError::Corrupt { .. }), "pth: {err}");
        let err = load_safetensors(tiny_unet("unet_tiny").1, "/nonexistent/x.safetensors", &KeyMap::new()).unwrap_err();
        assert!(matches!(err, LoadError::Io { .. }), "{err}");
    }

    #[test]
    fn missing_and_unused_keys_are_listed_with_hints() {
        // Without the rename table, `to_out.0.*` etc. are unused and `to_out.*` missing.
        let err = load_safetensors(tiny_unet("unet_tiny").1, weights(), &KeyMap::new()).unwrap_err();
        let LoadError::Mismatch { report, .. } = &err else {
            panic!("expected a mismatch, got {err}")
        };
        assert!(!report.missing.is_empty() && report.missing.len() == report.unused.len());
        let (key, hint) = report
            .missing
            .iter()
            .find(|(k, _)| k.ends_with("attn1.to_out.weight"))
            .expect("to_out missing");
        assert_eq!(hint.as_deref(), Some(key.replace("to_out.", "to_out.0.").as_str()));
        let message = err.to_string();
        assert!(message.contains("missing from the checkpoint"), "{message}");
        assert!(message.contains("did you mean"), "{message}");
        assert!(message.contains(&format!("... and {} more", report.missing.len() - LISTED_KEYS)));
        // Norm weights found under PyTorch's names are not reported as unused.
        assert!(report.unused.iter().all(|k| !k.ends_with("norm1.weight")), "{message}");
    }

    #[test]
    fn misshaped_keys_are_listed() {
        let (mut config, _) = tiny_unet("unet_tiny");
        config.cross_attention_dim = crate::unet::PerBlock::All(24);
        let model = config.init::<TestBackend>(&Default::default()).unwrap();
        let err = load_safetensors(model, weights(), &unet_key_map()).unwrap_err();
        let LoadError::Mismatch { report, .. } = &err else {
            panic!("expected a mismatch, got {err}")
        };
        assert!(report.missing.is_empty() && report.unused.is_empty(), "{err}");
        let m = report
            .mismatched
            .iter()
            .find(|m| m.key.ends_with("attn2.to_k.weight"))
            .expect("to_k mis-shaped");
        // burn layout [in, out]: the checkpoint's context width is 16.
        assert_eq!((m.expected[0], m.found[0]), (24, 16), "{err}");
        assert!(err.to_string().contains("mis-shaped"));
    }

    #[test]
    fn save_load_round_trip_is_exact() {
        let device = Default::default();
        let (config, model) = tiny_unet("unet_tiny");
        let path = std::env::temp_dir().join(format!("adjoint-dpm-models-{}-rt.safetensors", std::process::id()));
        save_safetensors(&model, &path).unwrap();
        let loaded = load_safetensors(config.init::<TestBackend>(&device).unwrap(), &path, &KeyMap::new());
        std::fs::remove_file(&path).ok();
        let loaded = loaded.unwrap();
        let x = burn::tensor::Tensor::<TestBackend, 4>::ones([1, 4, 8, 8], &device);
        let t = burn::tensor::Tensor::<TestBackend, 1>::from_floats([10.0], &device);
        let ctx = burn::tensor::Tensor::<TestBackend, 3>::ones([1, 3, 16], &device);
        let labels = || {
            Some(burn::tensor::Tensor::<TestBackend, 1, burn::tensor::Int>::from_ints(
                [2],
                &device,
            ))
        };
        let a = model.forward(x.clone(), t.clone(), ctx.clone(), labels()).into_data();
        let b = loaded.forward(x, t, ctx, labels()).into_data();
        assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    }

    /// Saving replaces the file in one step and leaves no temporary file; a save that cannot
    /// be written is a typed error naming the target and leaves nothing behind.
    #[test]
    fn save_is_atomic_and_reports_write_errors() {
        let (_, model) = tiny_unet("unet_tiny");
        let dir = std::env::temp_dir().join(format!("adjoint-dpm-models-{}-atomic", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("unet.safetensors");
        std::fs::write(&path, b"old contents").unwrap();
        save_safetensors(&model, &path).unwrap();
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["unet.safetensors".to_string()]);
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);

        let missing = dir.join("no-such-folder").join("unet.safetensors");
        let err = save_safetensors(&model, &missing).unwrap_err();
        assert!(
            matches!(err, LoadError::Write { ref path, .. } if path == &missing),
            "{err}"
        );
        assert!(err.to_string().contains("cannot write"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
        assert!(!dir.join("no-such-folder").exists());
    }
}
