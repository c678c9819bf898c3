//! Test helpers: fixture files, the test backends and the parity metric.

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// The CPU backend the parity tests run on (f32, as the fixtures).
pub type TestBackend = burn::backend::Flex;
/// The same with autodiff, for input gradients.
pub type TestAutodiffBackend = burn::backend::Autodiff<TestBackend>;

/// Path of a file under `models/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// The tensors of a fixture `io.safetensors`.
pub struct Io {
    bytes: Vec<u8>,
}

impl Io {
    /// Reads `fixtures/<dir>/io.safetensors`.
    pub fn open(dir: &str) -> Self {
        let path = fixture(&format!("{dir}/io.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    fn raw(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("valid io.safetensors");
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    /// An f32 tensor as burn data.
    pub fn data(&self, name: &str) -> TensorData {
        let (dtype, shape, bytes) = self.raw(name);
        assert_eq!(dtype, Dtype::F32, "{name}");
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        TensorData::new(values, shape)
    }

    /// An f32 tensor on `device`.
    pub fn float<B: Backend, const D: usize>(&self, name: &str, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(self.data(name), device)
    }

    /// An int64 tensor on `device`.
    pub fn int<B: Backend, const D: usize>(&self, name: &str, device: &B::Device) -> Tensor<B, D, Int> {
        let (dtype, shape, bytes) = self.raw(name);
        assert_eq!(dtype, Dtype::I64, "{name}");
        let values: Vec<i64> = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// `max |actual − expected| / max |expected|`: the relative error the parity tests bound.
pub fn rel_err(actual: &TensorData, expected: &TensorData) -> f32 {
    assert_eq!(actual.shape, expected.shape, "shapes differ");
    let a = actual.to_vec::<f32>().expect("f32 data");
    let e = expected.to_vec::<f32>().expect("f32 data");
    let diff = a.iter().zip(&e).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let scale = e.iter().map(|y| y.abs()).fold(0.0f32, f32::max);
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
    diff / scale.max(f32::MIN_POSITIVE)
}
