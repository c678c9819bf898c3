//! Resuming an interrupted optimisation. After every iteration a task loop saves what it
//! optimises (a module: the noise, an embedding, adapters), Adam's state and the losses so far
//! into `<out>/.resume-<iteration>/`; a later run on the same output directory with the same
//! settings (the iteration count aside, so a finished run can also be extended) continues from
//! the newest saved iteration with nothing lost.
//!
//! Each state is written into a temporary folder that is then renamed, so a `.resume-N` folder
//! is always complete; older ones are removed only after a newer one exists.

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::tasks::common::TaskError;

/// Where and under which settings a loop saves its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    out: PathBuf,
    key: String,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    key: String,
    iter: usize,
    losses: Vec<f64>,
}

/// A loop's state restored by [`Resume::restore`].
pub struct Restored<M, O> {
    /// The optimised module.
    pub module: M,
    /// The optimiser with its moments.
    pub optim: O,
    /// Iterations already done.
    pub iter: usize,
    /// Their losses.
    pub losses: Vec<f64>,
}

const PREFIX: &str = ".resume-";

fn io_error(path: &Path, e: impl std::fmt::Display) -> TaskError {
    TaskError::Resume {
        path: path.into(),
        message: e.to_string(),
    }
}

impl Resume {
    /// States in `out`, tagged with `key` (the run's settings, serialised): a state saved under
    /// another key is never restored.
    pub fn new(out: impl Into<PathBuf>, key: &impl Serialize) -> Self {
        Self {
            out: out.into(),
            key: serde_json::to_string(key).unwrap_or_default(),
        }
    }

    /// The saved iterations in `out`, newest first.
    fn saved(&self) -> Vec<(usize, PathBuf)> {
        let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&self.out)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let iter = name.strip_prefix(PREFIX)?.parse().ok()?;
                Some((iter, e.path()))
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found
    }

    /// The newest state saved under this key, loaded into `module` and `optim`; as given (at
    /// iteration 0) when there is none.
    pub fn restore<B, M, O>(&self, module: M, optim: O, device: &B::Device) -> Result<Restored<M, O>, TaskError>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        for (_, dir) in self.saved() {
            let meta_path = dir.join("state.json");
            let Ok(text) = std::fs::read_to_string(&meta_path) else {
                continue;
            };
            let meta: Meta = serde_json::from_str(&text).map_err(|e| io_error(&meta_path, e))?;
            if meta.key != self.key {
                continue;
            }
            let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
            let record = recorder
                .load(dir.join("module"), device)
                .map_err(|e| io_error(&dir, e))?;
            let optim_record = recorder
                .load(dir.join("optim"), device)
                .map_err(|e| io_error(&dir, e))?;
            return Ok(Restored {
                module: module.load_record(record),
                optim: optim.load_record(optim_record),
                iter: meta.iter,
                losses: meta.losses,
            });
        }
        Ok(Restored {
            module,
            optim,
            iter: 0,
            losses: Vec::new(),
        })
    }

    /// Removes every saved state in `out`.
    pub fn clear(&self) -> Result<(), TaskError> {
        for (_, dir) in self.saved() {
            std::fs::remove_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        }
        Ok(())
    }

    /// Saves the state after `iter` iterations, then removes older states.
    pub fn save<B, M, O>(&self, module: &M, optim: &O, iter: usize, losses: &[f64]) -> Result<(), TaskError>
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        let tmp = self.out.join(format!(".resume-tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        recorder
            .record(module.clone().into_record(), tmp.join("module"))
            .map_err(|e| io_error(&tmp, e))?;
        recorder
            .record(optim.to_record(), tmp.join("optim"))
            .map_err(|e| io_error(&tmp, e))?;
        let meta = Meta {
            key: self.key.clone(),
            iter,
            losses: losses.to_vec(),
        };
        let json = serde_json::to_vec(&meta).map_err(|e| io_error(&tmp, e))?;
        std::fs::write(tmp.join("state.json"), json).map_err(|e| io_error(&tmp, e))?;
        let target = self.out.join(format!("{PREFIX}{iter}"));
        let _ = std::fs::remove_dir_all(&target);
        std::fs::rename(&tmp, &target).map_err(|e| io_error(&target, e))?;
        for (old, dir) in self.saved() {
            if old != iter {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        Ok(())
    }
}

/// [`Resume::restore`] when resuming is on; the fresh state otherwise.
pub(crate) fn restore<B, M, O>(
    resume: &Option<Resume>,
    module: M,
    optim: O,
    device: &B::Device,
) -> Result<Restored<M, O>, TaskError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    match resume {
        Some(r) => r.restore(module, optim, device),
        None => Ok(Restored {
            module,
            optim,
            iter: 0,
            losses: Vec::new(),
        }),
    }
}

/// [`Resume::save`] when resuming is on.
pub(crate) fn save<B, M, O>(
    resume: &Option<Resume>,
    module: &M,
    optim: &O,
    iter: usize,
    losses: &[f64],
) -> Result<(), TaskError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    match resume {
        Some(r) => r.save(module, optim, iter, losses),
        None => Ok(()),
    }
}
