//! The four tasks end to end on the embedded toy model, tiny settings: every output file exists
//! and the metrics are finite.

use adjoint_dpm::tasks::run::{run_audit, run_finetune, run_guide, run_invert, RunConfig, RunError};
use adjoint_dpm::tasks::{GradientChoice, SolverChoice, TaskError};

fn config(out: &std::path::Path) -> RunConfig {
    RunConfig {
        out: out.to_path_buf(),
        weights: None,
        gradient: GradientChoice::Exact,
        solver: SolverChoice::Ddim,
        steps: 3,
        lr: 0.05,
        iters: 2,
        seed: 1,
        cfg: 3.0,
        batch: 2,
        ..RunConfig::default()
    }
}

fn outputs_exist(dir: &std::path::Path) {
    for f in ["before_after.png", "loss.png", "metrics.json"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
}

#[test]
fn every_task_runs_end_to_end_and_writes_its_outputs() {
    let root = std::env::temp_dir().join(format!("adjoint-dpm-run-{}", std::process::id()));
    let dir = |name: &str| root.join(name);
    let r = run_guide(&config(&dir("guide")), "ring", 0.1, &mut |_, _| {}).unwrap();
    assert_eq!(r.losses.len(), 2);
    assert!(r.losses.iter().all(|l| l.is_finite()));
    outputs_exist(&dir("guide"));
    let mut adjoint = config(&dir("audit"));
    adjoint.gradient = GradientChoice::AdjointDpm;
    let r = run_audit(&adjoint, 0.2, &mut |_, _| {}).unwrap();
    assert!(r.mean_image_rms.is_finite());
    outputs_exist(&dir("audit"));
    // UniPC on Karras' levels (`--solver unipc --karras`), recorded in the metrics.
    let mut unipc = config(&dir("invert"));
    (unipc.solver, unipc.karras) = (SolverChoice::Unipc, true);
    let r = run_invert(&unipc, "square", &mut |_, _| {}).unwrap();
    assert!(r.loss_before.is_finite() && r.loss_after.is_finite());
    outputs_exist(&dir("invert"));
    let metrics = std::fs::read_to_string(dir("invert").join("metrics.json")).unwrap();
    assert!(
        metrics.contains(r#""karras": true"#) && metrics.contains(r#""solver": "unipc""#),
        "{metrics}"
    );
    let r = run_finetune(&config(&dir("finetune")), "cross", 2, &mut |_, _| {}).unwrap();
    assert!(r.loss_before.is_finite() && r.loss_after.is_finite());
    outputs_exist(&dir("finetune"));
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn bad_inputs_are_typed_errors() {
    let root = std::env::temp_dir().join(format!("adjoint-dpm-bad-{}", std::process::id()));
    let e = run_guide(&config(&root), "hexagon", 0.1, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, RunError::Toy(_)), "{e:?}");
    assert!(e.to_string().contains("hexagon"), "{e}");
    let mut zero = config(&root);
    zero.steps = 0;
    assert!(matches!(
        run_guide(&zero, "ring", 0.1, &mut |_, _| {}),
        Err(RunError::Task(_))
    ));
    let mut bad_eps = config(&root);
    bad_eps.iters = 1;
    assert!(run_audit(&bad_eps, -1.0, &mut |_, _| {}).is_err());
    // A non-finite guidance scale is refused even by a task that samples without guidance.
    let mut bad_cfg = config(&root);
    bad_cfg.cfg = f64::NAN;
    let e = run_guide(&bad_cfg, "ring", 0.1, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, RunError::Task(_)) && e.to_string().contains("cfg"), "{e}");
    // LoRA rank 0 used to reach the sampler as 0/0 and fail there as a non-finite prediction.
    let e = run_finetune(&config(&root), "cross", 0, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, RunError::Task(_)) && e.to_string().contains("rank"), "{e}");
    // A learning rate that wrecks the embedding in one step: the next sampling breaks down,
    // and the error says it was the step, not the model.
    let mut huge_lr = config(&root);
    huge_lr.lr = 1e30;
    let e = run_invert(&huge_lr, "ring", &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(e, RunError::Task(TaskError::Diverged { iter: 1, .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("lower --lr"), "{e}");
    // An output path that is a file, not a directory.
    std::fs::create_dir_all(&root).unwrap();
    let file = root.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        run_guide(&config(&file), "ring", 0.1, &mut |_, _| {}),
        Err(RunError::Output { .. })
    ));
    let mut missing = config(&root);
    missing.weights = Some(root.join("no-such-weights"));
    assert!(run_guide(&missing, "ring", 0.1, &mut |_, _| {}).is_err());
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn an_interrupted_run_continues_where_it_stopped() {
    let root = std::env::temp_dir().join(format!("adjoint-dpm-resume-{}", std::process::id()));
    let (a, b) = (root.join("a"), root.join("b"));
    // "Interrupted" after 2 of 4 iterations, then run again with the same settings.
    let mut first = config(&a);
    first.iters = 2;
    let r = run_guide(&first, "ring", 0.1, &mut |_, _| {}).unwrap();
    assert!(a.join(".resume-2").is_dir());
    let mut second = config(&a);
    second.iters = 4;
    let mut seen = Vec::new();
    let resumed = run_guide(&second, "ring", 0.1, &mut |i, _| seen.push(i)).unwrap();
    assert_eq!(seen, vec![2, 3], "only the missing iterations run");
    assert!(a.join(".resume-4").is_dir() && !a.join(".resume-2").exists());
    assert_eq!(&resumed.losses[..2], &r.losses[..]);
    // The same as an uninterrupted run: Adam's moments were restored too.
    let mut whole = config(&b);
    whole.iters = 4;
    let straight = run_guide(&whole, "ring", 0.1, &mut |_, _| {}).unwrap();
    for (x, y) in resumed.losses.iter().zip(&straight.losses) {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1.0),
            "{:?} vs {:?}",
            resumed.losses,
            straight.losses
        );
    }
    // Other settings, or --fresh, start over.
    let mut other = config(&a);
    other.iters = 4;
    other.fresh = true;
    let mut seen = Vec::new();
    run_guide(&other, "ring", 0.1, &mut |i, _| seen.push(i)).unwrap();
    assert_eq!(seen, vec![0, 1, 2, 3]);
    let mut seen = Vec::new();
    run_guide(&second, "circle", 0.1, &mut |i, _| seen.push(i)).unwrap();
    assert_eq!(seen, vec![0, 1, 2, 3]);
    // So do other weights under the same path (retrained, replaced).
    let weights = root.join("weights");
    std::fs::create_dir_all(&weights).unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/weights");
    for f in ["toy.json", "denoiser.safetensors", "classifier.safetensors"] {
        std::fs::copy(shipped.join(f), weights.join(f)).unwrap();
    }
    let mut with_dir = config(&root.join("c"));
    with_dir.weights = Some(weights.clone());
    run_guide(&with_dir, "ring", 0.1, &mut |_, _| {}).unwrap();
    let mut seen = Vec::new();
    with_dir.iters = 3;
    run_guide(&with_dir, "ring", 0.1, &mut |i, _| seen.push(i)).unwrap();
    assert_eq!(seen, vec![2], "same weights: continued");
    let replaced = std::fs::File::options()
        .write(true)
        .open(weights.join("denoiser.safetensors"))
        .unwrap();
    replaced.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    drop(replaced);
    let mut seen = Vec::new();
    with_dir.iters = 4;
    run_guide(&with_dir, "ring", 0.1, &mut |i, _| seen.push(i)).unwrap();
    assert_eq!(seen, vec![0, 1, 2, 3], "replaced weights: started over");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn the_command_line_refuses_stable_diffusion_options_for_the_toy_model() {
    // Before, `--prompt` was silently ignored on the toy model (it is conditioned on classes).
    let out = std::env::temp_dir().join(format!("adjoint-dpm-cli-{}", std::process::id()));
    for flag in [["--prompt", "a photo of a ring"], ["--classifier", "resnet50.pth"]] {
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_adjoint-dpm"))
            .args(["guide", "--iters", "1", "--out"])
            .arg(&out)
            .args(flag)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{flag:?} was accepted");
        assert!(stderr.contains("for Stable Diffusion folders"), "{stderr}");
    }
    std::fs::remove_dir_all(&out).ok();
}

/// img2img on the toy model: from a ring image at strength 0.3 (the last 3 of 10 steps) the
/// samples stay rings whatever class conditions them; at strength 1 they follow their class.
#[test]
fn sample_from_an_init_image_keeps_it_at_low_strength() {
    use adjoint_dpm::tasks::run::{sample_grid, InitImage};
    use adjoint_dpm::toy::{self, CLASSES, IMAGE_SIZE};
    let root = std::env::temp_dir().join(format!("adjoint-dpm-img2img-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let ring = CLASSES.iter().position(|c| *c == "ring").unwrap();
    // Written pixel for pixel: the model is sensitive enough that a resized, bordered copy
    // (`write_png_grid`'s frame) loses the ring at this strength.
    let image = toy::dataset_of_class(ring, 1, 5).unwrap();
    let path = root.join("ring.png");
    let plane = IMAGE_SIZE * IMAGE_SIZE;
    let byte = |c: usize, x: u32, y: u32| {
        let v = image.images[c * plane + y as usize * IMAGE_SIZE + x as usize];
        ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
    };
    let side = IMAGE_SIZE as u32;
    image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([byte(0, x, y), byte(1, x, y), byte(2, x, y)])
    })
    .save(&path)
    .unwrap();
    let mut c = config(&root);
    (c.steps, c.batch) = (10, 1);
    let rings = |labels: &[usize]| labels.iter().filter(|&&l| l == ring).count();
    let kept = sample_grid(
        &c,
        Some(InitImage {
            path: &path,
            strength: 0.3,
            mask: None,
        }),
    )
    .unwrap();
    assert_eq!(kept.len(), CLASSES.len());
    assert!(
        rings(&kept) >= CLASSES.len() - 1,
        "labels from a ring at strength 0.3: {kept:?}"
    );
    let free = sample_grid(
        &c,
        Some(InitImage {
            path: &path,
            strength: 1.0,
            mask: None,
        }),
    )
    .unwrap();
    assert!(rings(&free) <= 2, "labels from a ring at strength 1: {free:?}");
    // A strength that keeps no step, or a missing image, is a typed error.
    let bad = |strength, path: &std::path::Path| {
        sample_grid(
            &c,
            Some(InitImage {
                path,
                strength,
                mask: None,
            }),
        )
        .unwrap_err()
    };
    assert!(bad(0.05, &path).to_string().contains("strength"));
    // The toy model does not inpaint.
    let masked = InitImage {
        path: &path,
        strength: 1.0,
        mask: Some(&path),
    };
    assert!(matches!(sample_grid(&c, Some(masked)), Err(RunError::Usage(_))));
    assert!(matches!(bad(0.5, &root.join("missing.png")), RunError::Image { .. }));
    std::fs::remove_dir_all(&root).ok();
}
