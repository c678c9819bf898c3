//! What every task run writes into its output directory: a before/after PNG grid, a loss-curve
//! PNG and `metrics.json`, each written atomically (a temporary file, then a rename), so an
//! interrupted run never leaves a partial file behind.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::Serialize;

use crate::tasks::common::TaskError;
use crate::tasks::run::RunError;
use crate::toy;

/// Checks the batch and step counts, the guidance scale and that `out` can be created and
/// written, before any work.
pub(crate) fn prepare(out: &Path, batch: usize, steps: usize, cfg: f64) -> Result<(), RunError> {
    if batch == 0 || steps == 0 {
        return Err(TaskError::InvalidOption {
            name: "batch/steps",
            value: "0".into(),
            rule: "must be ≥ 1",
        }
        .into());
    }
    // Checked here even for the tasks that sample without guidance, so that a bad value is never
    // silently recorded in metrics.json as if it had been used.
    if !cfg.is_finite() {
        return Err(TaskError::InvalidOption {
            name: "cfg",
            value: cfg.to_string(),
            rule: "must be finite",
        }
        .into());
    }
    let failed = |e: std::io::Error| RunError::Output {
        path: out.into(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(failed)?;
    let probe = out.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(failed)
}

/// Writes `before_after.png` (first row before, second after; images in `[-1, 1]`),
/// `loss.png` and `metrics.json` (`{"config": …, "metrics": …}`) into `out`.
pub(crate) fn write_outputs<B: Backend, C: Serialize, M: Serialize>(
    out: &Path,
    config: &C,
    before: Tensor<B, 4>,
    after: Tensor<B, 4>,
    losses: &[f64],
    metrics: &M,
) -> Result<(), RunError> {
    let [n, _, h, w] = before.dims();
    let values = |t: Tensor<B, 4>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default();
    let mut grid = values(before);
    grid.extend(values(after));
    toy::write_png_grid(&out.join("before_after.png"), &grid, 2 * n, [h, w], n, (96 / h).max(1))?;
    write_curve(&out.join("loss.png"), losses)?;
    let path = out.join("metrics.json");
    let json =
        serde_json::to_vec_pretty(&serde_json::json!({ "config": config, "metrics": metrics })).map_err(|e| {
            RunError::Output {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
    toy::png::write_atomic(&path, &json)?;
    Ok(())
}

/// A loss curve as a 480×240 PNG (no axes: the values are in metrics.json).
pub(crate) fn write_curve(path: &Path, losses: &[f64]) -> Result<(), RunError> {
    let (w, h) = (480u32, 240u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let finite: Vec<f64> = losses.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.len() >= 2 {
        let (lo, hi) = finite
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let span = (hi - lo).max(1e-12);
        let point = |i: usize, v: f64| {
            let x = 10.0 + (w as f64 - 20.0) * i as f64 / (finite.len() - 1) as f64;
            let y = 10.0 + (h as f64 - 20.0) * (hi - v) / span;
            (x, y)
        };
        for i in 1..finite.len() {
            let ((x0, y0), (x1, y1)) = (point(i - 1, finite[i - 1]), point(i, finite[i]));
            let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
            for s in 0..=steps {
                let f = s as f64 / steps as f64;
                let (x, y) = ((x0 + f * (x1 - x0)) as u32, (y0 + f * (y1 - y0)) as u32);
                for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                    if x + dx < w && y + dy < h {
                        img.put_pixel(x + dx, y + dy, image::Rgb([31, 119, 180]));
                    }
                }
            }
        }
    }
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| RunError::Output {
            path: path.into(),
            message: e.to_string(),
        })?;
    toy::png::write_atomic(path, &bytes)?;
    Ok(())
}
