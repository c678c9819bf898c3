//! The embedded default: the procedural data set, the shipped weights, the conditioned ε-model,
//! a tiny training run, saving and loading, and typed errors for bad input.

use adjoint_dpm::diffusion::{Cfg, EpsModel, Sampler};
use adjoint_dpm::toy::{self, denoiser, train, ClassifierConfig, DenoiserConfig, ToyError, TrainConfig};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor, TensorData};

type B = Flex;
type Ad = Autodiff<Flex>;

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn t100() -> Tensor<B, 1> {
    Tensor::from_data(TensorData::from([100.0f32]), &Default::default())
}

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("adjoint-dpm-toy-test-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

#[test]
fn dataset_is_deterministic_balanced_and_in_range() {
    let a = toy::dataset(60, 7);
    assert_eq!(a, toy::dataset(60, 7), "same seed, same data");
    assert_ne!(a.images, toy::dataset(60, 8).images, "another seed, other data");
    assert_eq!(a.images.len(), 60 * 3 * 32 * 32);
    assert_eq!(a.class_counts(), [10; toy::NUM_CLASSES]);
    assert!(a.images.iter().all(|v| (-1.0..=1.0).contains(v)));
    // A prefix of a longer draw, and the held-out stream differs from the training stream.
    let b = toy::dataset(12, 7);
    assert_eq!(b.images[..], a.images[..b.images.len()]);
    assert_ne!(toy::train_seed(0), toy::held_out_seed(0));
    // Images are not flat: every one has a visible shape on its background.
    let pixels = 3 * 32 * 32;
    for img in a.images.chunks(pixels) {
        let (lo, hi) = img.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(hi - lo > 0.3, "flat image: {lo}..{hi}");
    }
    let ring = toy::dataset_of_class(4, 3, 1).unwrap();
    assert_eq!(ring.labels, vec![4; 3]);
}

#[test]
fn class_names_and_indices_are_checked() {
    assert_eq!(toy::class_index("ring").unwrap(), 4);
    assert_eq!(toy::class_index(" Circle ").unwrap(), 0);
    let err = toy::class_index("blob").unwrap_err();
    assert!(matches!(err, ToyError::UnknownClassName { .. }));
    assert!(err.to_string().contains("circle"), "{err}");
    assert!(matches!(
        toy::dataset_of_class(toy::NUM_CLASSES, 1, 0),
        Err(ToyError::UnknownClass { index: 6 })
    ));
}

#[test]
fn shipped_classifier_is_accurate_on_fresh_data() {
    let device = Default::default();
    let (_, classifier, _) = toy::load_default::<B>(&device).expect("the embedded weights load");
    // Seed 12345 was never used in training (whose streams derive from seed 0).
    let data = toy::dataset(300, 12345);
    let predicted = classifier.predict(data.images_tensor::<B>(&device));
    let correct = predicted.iter().zip(&data.labels).filter(|(p, l)| p == l).count();
    let accuracy = correct as f64 / data.n as f64;
    eprintln!("shipped classifier: {:.1}% on 300 fresh images", 100.0 * accuracy);
    assert!(accuracy > 0.9, "accuracy {accuracy}");
    let record = toy::default_record().unwrap();
    assert!(record.report.classifier_held_out_accuracy > 0.9);
    let features = classifier.features(data.images_tensor::<B>(&device).narrow(0, 0, 2));
    assert_eq!(features.len(), 4);
    assert_eq!(features[3].dims()[0], 2);
}

#[test]
fn conditioned_model_samples_with_ddim_and_guidance() {
    let device = Default::default();
    let (denoiser, _, schedule) = toy::load_default::<B>(&device).unwrap();
    let x_t = Tensor::<B, 4>::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);

    let model = denoiser.conditioned(&[Some(0), None]).unwrap();
    let eps = model.eps(x_t.clone(), Tensor::from_data(TensorData::from([500.0f32]), &device));
    assert_eq!(eps.dims(), [2, 3, 32, 32]);
    let x0 = Sampler::ddim(3)
        .sample_inference(&model, &schedule, x_t.clone())
        .unwrap();
    assert_eq!(x0.dims(), [2, 3, 32, 32]);
    assert!(values(x0).iter().all(|v| v.is_finite()));

    let guided = Cfg::new(denoiser.conditioned_for_guidance(&[1, 4]).unwrap(), 3.0).unwrap();
    let x0 = Sampler::ddim(3)
        .sample_inference(&guided, &schedule, x_t.clone())
        .unwrap();
    assert!(values(x0).iter().all(|v| v.is_finite()));

    // One context row serves any batch.
    let uncond = denoiser.unconditional();
    let x0 = Sampler::ddim(2).sample_inference(&uncond, &schedule, x_t).unwrap();
    assert_eq!(x0.dims(), [2, 3, 32, 32]);
}

#[test]
fn context_is_a_trainable_parameter() {
    let device = Default::default();
    let denoiser = DenoiserConfig::unet(4, &[16, 16], 8, 4, 2).init::<Ad>(&device).unwrap();
    let model = denoiser.conditioned(&[Some(2)]).unwrap();
    let x = Tensor::<Ad, 4>::random([1, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<Ad, 1>::from_data(TensorData::from([300.0f32]), &device);
    let grads = model.eps(x, t).powi_scalar(2).sum().backward();
    let g = model.context.val().grad(&grads).expect("the context gets a gradient");
    assert_eq!(g.dims(), [1, 1, 8]);
    assert!(g.abs().sum().into_scalar() > 0.0);
}

#[test]
fn bad_labels_are_typed_errors() {
    let device = Default::default();
    let denoiser = DenoiserConfig::unet(4, &[16, 16], 8, 4, 2).init::<B>(&device).unwrap();
    assert!(matches!(
        denoiser.conditioned(&[Some(0), Some(6)]),
        Err(ToyError::UnknownClass { index: 6 })
    ));
    assert!(matches!(
        denoiser.conditioned_for_guidance(&[9]),
        Err(ToyError::UnknownClass { index: 9 })
    ));
    assert!(matches!(denoiser.conditioned(&[]), Err(ToyError::EmptyBatch)));
    // A batch the conditioning was not made for fails before the first network call.
    let schedule = adjoint_dpm::diffusion::NoiseSchedule::sd_scaled_linear();
    let x_t = Tensor::<B, 4>::zeros([3, 3, 32, 32], &device);
    let two = denoiser.conditioned(&[Some(0), Some(1)]).unwrap();
    let err = Sampler::ddim(2)
        .sample_inference(&two, &schedule, x_t.clone())
        .unwrap_err();
    assert!(
        matches!(
            err,
            adjoint_dpm::diffusion::DiffusionError::BatchMismatch { batch: 3, .. }
        ),
        "{err}"
    );
    let guided = Cfg::new(denoiser.conditioned_for_guidance(&[1, 4]).unwrap(), 3.0).unwrap();
    let err = Sampler::ddim(2).sample_inference(&guided, &schedule, x_t).unwrap_err();
    assert!(
        matches!(
            err,
            adjoint_dpm::diffusion::DiffusionError::BatchMismatch { batch: 6, .. }
        ),
        "{err}"
    );
    let bad_patch = DenoiserConfig {
        patch: 3,
        ..DenoiserConfig::default()
    };
    assert!(matches!(
        bad_patch.init::<B>(&device),
        Err(ToyError::InvalidOption {
            name: "denoiser.patch",
            ..
        })
    ));
}

#[test]
fn pixel_shuffle_inverts_unshuffle() {
    let device = Default::default();
    let x = Tensor::<B, 4>::random([2, 3, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let folded = denoiser::pixel_unshuffle(x.clone(), 4);
    assert_eq!(folded.dims(), [2, 48, 2, 2]);
    // PyTorch's layout: channel c·p² + i·p + j holds pixel (i, j) of each patch.
    let direct = x.clone().slice([0..1, 1..2, 5..6, 2..3]);
    let via = folded.clone().slice([0..1, 16 + 4 + 2..16 + 4 + 3, 1..2, 0..1]);
    assert_eq!(values(direct), values(via));
    assert_eq!(values(denoiser::pixel_shuffle(folded, 4)), values(x));
}

fn tiny_config(steps: usize) -> TrainConfig {
    TrainConfig {
        seed: 3,
        denoiser: DenoiserConfig::unet(4, &[16, 16], 8, 4, 2),
        classifier: ClassifierConfig {
            widths: [8, 8, 8],
            groups: 4,
        },
        steps,
        batch: 8,
        lr: 2e-3,
        warmup: 2,
        classifier_steps: 3,
        classifier_batch: 8,
        held_out: 12,
        eval_samples: 6,
        eval_steps: 2,
        ..TrainConfig::default()
    }
}

#[test]
fn tiny_training_lowers_the_loss() {
    let device = Default::default();
    let steps = 80;
    // ε-prediction: its loss starts near 1 (v-prediction's is already low at the start).
    let mut config = tiny_config(steps);
    config.denoiser.prediction = toy::Prediction::Epsilon;
    config.lr = 1e-2;
    let mut reports = 0;
    let (_, losses) = train::train_denoiser::<Ad>(&config, &device, None, &mut |_| reports += 1).unwrap();
    assert_eq!(reports, steps);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (head, tail) = (mean(&losses[..5]), mean(&losses[steps - 20..]));
    eprintln!("tiny run: loss {head:.3} -> {tail:.3}");
    assert!(tail < 0.85 * head, "loss {head} -> {tail}");
}

#[test]
fn trained_models_save_and_load_from_a_directory() {
    let device = Default::default();
    let config = tiny_config(2);
    let trained = train::train::<Ad>(&config, &device, &mut |_| {}).unwrap();
    assert_eq!(trained.samples.len(), 6 * 3 * 32 * 32);
    let record = toy::ToyRecord {
        format: train::RECORD_FORMAT.into(),
        command: "test".into(),
        crate_version: "0".into(),
        threads: 1,
        train: config,
        report: trained.report.clone(),
        previous: None,
    };
    let dir = scratch_dir("save");
    train::save(&dir, &trained, &record).unwrap();
    for file in [
        toy::files::RECORD,
        toy::files::DENOISER,
        toy::files::CLASSIFIER,
        toy::files::SAMPLES,
    ] {
        assert!(dir.join(file).is_file(), "{file} written");
    }
    // No temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

    let (denoiser, classifier, _) = toy::load_from_dir::<B>(&dir, &device).unwrap();
    let x = Tensor::<B, 4>::random([1, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<B, 1>::from_data(TensorData::from([100.0f32]), &device);
    let a = trained
        .denoiser
        .conditioned(&[Some(1)])
        .unwrap()
        .eps(x.clone(), t.clone());
    let b = denoiser.conditioned(&[Some(1)]).unwrap().eps(x.clone(), t);
    assert_eq!(values(a), values(b));
    assert_eq!(
        values(trained.classifier.logits(x.clone())),
        values(classifier.logits(x.clone()))
    );

    // Continuing from the loaded weights: the classifier is kept (no classifier steps), the
    // denoiser moves on from where it was.
    let before = values(denoiser.conditioned(&[Some(1)]).unwrap().eps(x.clone(), t100()));
    let more = TrainConfig {
        seed: 4,
        classifier_steps: 0,
        ..tiny_config(2)
    };
    let continued = train::train_from::<Ad>(&more, &device, Some((denoiser, classifier.clone())), &mut |_| {}).unwrap();
    assert_eq!(
        values(continued.classifier.logits(x.clone())),
        values(classifier.logits(x.clone()))
    );
    let after = values(
        continued
            .denoiser
            .conditioned(&[Some(1)])
            .unwrap()
            .eps(x.clone(), t100()),
    );
    let moved = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-6 && moved < 1.0, "continued training moved ε by {moved}");
    // Its record keeps the first run's inside and round-trips although the classifier's loss
    // is NaN (null in JSON): nothing trained it.
    let continued_dir = scratch_dir("continued");
    let chained = toy::ToyRecord {
        train: more,
        report: continued.report.clone(),
        previous: Some(Box::new(record.clone())),
        ..record.clone()
    };
    train::save(&continued_dir, &continued, &chained).unwrap();
    let back = toy::read_record(&continued_dir).unwrap();
    assert!(back.report.classifier_final_loss.is_nan());
    assert_eq!(back.previous.as_deref(), Some(&record));
    toy::load_from_dir::<B>(&continued_dir, &device).unwrap();

    // A corrupt record and a missing weights file are typed errors.
    std::fs::write(dir.join(toy::files::RECORD), "{ not json").unwrap();
    assert!(matches!(
        toy::load_from_dir::<B>(&dir, &device),
        Err(ToyError::Record { .. })
    ));
    let json = serde_json::to_string(&record).unwrap();
    std::fs::write(dir.join(toy::files::RECORD), json).unwrap();
    std::fs::remove_file(dir.join(toy::files::CLASSIFIER)).unwrap();
    let err = toy::load_from_dir::<B>(&dir, &device).unwrap_err();
    assert!(matches!(err, ToyError::Io { .. }), "{err}");
    assert!(err.to_string().contains(toy::files::CLASSIFIER), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_weights_directory_is_a_typed_error() {
    let device = Default::default();
    let err = toy::load_from_dir::<B>(std::path::Path::new("/nonexistent/toy-weights"), &device).unwrap_err();
    assert!(matches!(err, ToyError::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/toy-weights"), "{err}");
}

#[test]
fn bad_training_options_are_typed_errors() {
    let device = Default::default();
    for config in [
        TrainConfig {
            steps: 0,
            ..tiny_config(1)
        },
        TrainConfig {
            lr: f64::NAN,
            ..tiny_config(1)
        },
        TrainConfig {
            label_dropout: 1.5,
            ..tiny_config(1)
        },
        TrainConfig {
            min_snr_gamma: -1.0,
            ..tiny_config(1)
        },
    ] {
        let err = train::train::<Ad>(&config, &device, &mut |_| {}).unwrap_err();
        assert!(matches!(err, ToyError::InvalidOption { .. }), "{err}");
    }
}

#[test]
fn png_grid_checks_its_input() {
    let dir = scratch_dir("png");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("grid.png");
    let err = toy::write_png_grid(&path, &[0.0; 10], 2, [2, 2], 2, 1).unwrap_err();
    assert!(matches!(err, ToyError::Image { .. }), "{err}");
    toy::write_png_grid(&path, &[0.5; 2 * 3 * 4], 2, [2, 2], 2, 3).unwrap();
    assert!(path.is_file());
    let err = toy::write_png_grid(&dir.join("missing/grid.png"), &[0.5; 12], 1, [2, 2], 1, 1).unwrap_err();
    assert!(matches!(err, ToyError::Io { .. }), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
