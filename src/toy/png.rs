//! PNG grids of images, written atomically.

use std::path::Path;

use super::ToyError;

/// Writes `n` RGB images (`[n, 3, h, w]` flattened, values in `[-1, 1]`, clamped) as one PNG
/// grid with `cols` columns, each pixel scaled `scale`× (nearest), 2-pixel white gutters.
///
/// The file is written to a temporary sibling and renamed into place, so an interrupted write
/// leaves no partial file.
pub fn write_png_grid(
    path: &Path,
    images: &[f32],
    n: usize,
    size: [usize; 2],
    cols: usize,
    scale: usize,
) -> Result<(), ToyError> {
    let [h, w] = size;
    let bad = |message: String| ToyError::Image {
        path: path.into(),
        message,
    };
    if n == 0 || cols == 0 || scale == 0 || h == 0 || w == 0 {
        return Err(bad(format!(
            "nothing to draw: n = {n}, cols = {cols}, scale = {scale}, size = {h}×{w}"
        )));
    }
    if images.len() != n * 3 * h * w {
        return Err(bad(format!("{} values for {n} images of 3×{h}×{w}", images.len())));
    }
    const GAP: usize = 2;
    let cols = cols.min(n);
    let rows = n.div_ceil(cols);
    let (cw, ch) = (w * scale + GAP, h * scale + GAP);
    let (width, height) = (cols * cw + GAP, rows * ch + GAP);
    let mut canvas = image::RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255, 255, 255]));
    for i in 0..n {
        let (r, c) = (i / cols, i % cols);
        let img = &images[i * 3 * h * w..(i + 1) * 3 * h * w];
        for y in 0..h * scale {
            for x in 0..w * scale {
                let (sy, sx) = (y / scale, x / scale);
                let px = |ch: usize| {
                    let v = img[(ch * h + sy) * w + sx];
                    let v = if v.is_finite() { v } else { 0.0 };
                    (((v + 1.0) * 127.5).round().clamp(0.0, 255.0)) as u8
                };
                canvas.put_pixel(
                    (GAP + c * cw + x) as u32,
                    (GAP + r * ch + y) as u32,
                    image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    }
    let mut bytes = Vec::new();
    canvas
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| bad(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to a temporary sibling of `path`, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ToyError> {
    let tmp = adjoint_dpm_models::load::tmp_sibling(path);
    let io = |source| ToyError::Io {
        path: path.into(),
        source,
    };
    if let Err(e) = std::fs::write(&tmp, bytes) {
        std::fs::remove_file(&tmp).ok();
        return Err(io(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        io(e)
    })
}
