//! Textual-inversion embeddings: learned input vectors for new prompt tokens (a concept, a
//! style, A1111's negative embeddings such as EasyNegative), added to the CLIP tokenizer and to
//! the text encoder's token table, as diffusers' `load_textual_inversion` does.
//!
//! A file is read in any of the layouts people share: diffusers' (`{token: [vectors, width]}`,
//! `learned_embeds.safetensors`), A1111's safetensors (`{"emb_params": …}`, the token being the
//! file's name), SDXL's (`{"clip_l": …, "clip_g": …}`, one table per text encoder), or
//! diffusers' pickled `learned_embeds.bin`. A token of `n > 1` vectors becomes the tokens
//! `token token_1 … token_{n−1}`, and a prompt naming it is expanded to them
//! ([`crate::clip::ClipTokenizer::encode`]).

use std::path::Path;

use burn::module::Param;
use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::clip::{ClipTextModel, ClipTokenizer};
use crate::load::{read_pytorch, read_safetensors, LoadError};

/// The vectors of one textual-inversion file.
#[derive(Debug, Clone, PartialEq)]
pub struct TextualInversion {
    /// The token the prompt names it by.
    pub token: String,
    /// One `[vectors, width]` table per text encoder, in order (one for SD 1.x/2.x, SDXL's
    /// `clip_l` then `clip_g`), row-major.
    pub tables: Vec<(Vec<f32>, [usize; 2])>,
}

impl TextualInversion {
    /// Reads the file at `path`; `token` overrides the token it names (its only key in
    /// diffusers' layout), which otherwise is the file's stem for A1111's and SDXL's layouts.
    pub fn read(path: &Path, token: Option<&str>) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Corrupt {
            path: path.into(),
            format: "textual inversion",
            message,
        };
        let snapshots = match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => read_safetensors(path)?,
            Some("bin") => read_pytorch(path, None)?,
            _ => {
                return Err(LoadError::Unsupported(format!(
                    "{}: textual inversion files are read as .safetensors or diffusers' .bin (A1111's .pt \
                     pickles: convert them to safetensors)",
                    path.display()
                )))
            }
        };
        let table = |name: &str| -> Result<(Vec<f32>, [usize; 2]), LoadError> {
            let snapshot = snapshots
                .iter()
                .find(|s| s.full_path() == name)
                .ok_or_else(|| bad(format!("no {name:?} tensor")))?;
            let data = snapshot
                .to_data()
                .map_err(|e| bad(format!("{name}: {e}")))?
                .convert_dtype(burn::tensor::DType::F32);
            let shape = data.shape.to_vec();
            let dims = match shape[..] {
                [width] => [1, width],
                [n, width] if n > 0 => [n, width],
                _ => return Err(bad(format!("{name} has shape {shape:?}, not [vectors, width]"))),
            };
            let values = data.to_vec::<f32>().map_err(|e| bad(format!("{name}: {e:?}")))?;
            Ok((values, dims))
        };
        let stem = || {
            path.file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string()
        };
        let names: Vec<String> = snapshots.iter().map(|s| s.full_path()).collect();
        let has = |name: &str| names.iter().any(|n| n == name);
        let (file_token, tables) = if has("clip_l") && has("clip_g") {
            (stem(), vec![table("clip_l")?, table("clip_g")?])
        } else if has("emb_params") {
            (stem(), vec![table("emb_params")?])
        } else if let [only] = &names[..] {
            (only.clone(), vec![table(only)?])
        } else {
            return Err(bad(format!(
                "{} tensors ({}): expected one (diffusers' {{token: vectors}}), emb_params (A1111) or \
                 clip_l and clip_g (SDXL)",
                names.len(),
                names.iter().take(4).cloned().collect::<Vec<_>>().join(", ")
            )));
        };
        let token = token.map_or(file_token, str::to_string);
        if token.trim().is_empty() || token.chars().any(char::is_whitespace) {
            return Err(bad(format!("the token {token:?} is empty or holds spaces")));
        }
        Ok(Self { token, tables })
    }

    /// The tokens its vectors take: `token`, then `token_1` … for more than one.
    pub fn tokens(&self, table: usize) -> Vec<String> {
        let n = self.tables.get(table).map_or(1, |(_, [n, _])| *n);
        std::iter::once(self.token.clone())
            .chain((1..n).map(|i| format!("{}_{i}", self.token)))
            .collect()
    }
}

/// Adds table `table` of `inversion` to `tokenizer` and `encoder`: its tokens to the
/// vocabulary (with ids following the encoder's token table) and its vectors as those ids'
/// rows. Returns the encoder with the longer table.
pub fn add_textual_inversion<B: Backend>(
    tokenizer: &mut ClipTokenizer,
    encoder: ClipTextModel<B>,
    inversion: &TextualInversion,
    table: usize,
) -> Result<ClipTextModel<B>, LoadError> {
    let unsupported =
        |message: String| LoadError::Unsupported(format!("textual inversion {:?}: {message}", inversion.token));
    let (values, [n, width]) = inversion
        .tables
        .get(table)
        .cloned()
        .ok_or_else(|| unsupported(format!("no table for text encoder {}", table + 1)))?;
    let weight = encoder.embeddings.token_embedding.weight.val();
    let [rows, d] = weight.dims();
    if width != d {
        return Err(unsupported(format!(
            "{width}-wide vectors, but the text encoder's tokens are {d} wide (an embedding of another model?)"
        )));
    }
    let tokens = inversion.tokens(table);
    let ids = tokenizer.add_tokens(&tokens)?;
    if ids.first() != Some(&(rows as u32)) {
        return Err(unsupported(format!(
            "the tokenizer gives it id {:?} but the text encoder's table has {rows} rows",
            ids.first()
        )));
    }
    let device = weight.device();
    let trainable = encoder.embeddings.token_embedding.weight.is_require_grad();
    let added = Tensor::<B, 2>::from_data(TensorData::new(values, [n, width]), (&device, weight.dtype()));
    let mut encoder = encoder;
    // A new leaf (the table is a parameter, not a result), as trainable as the old one.
    let table = Tensor::cat(vec![weight, added], 0).detach();
    encoder.embeddings.token_embedding = Embedding {
        weight: Param::from_tensor(table).set_require_grad(trainable),
    };
    Ok(encoder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixture;

    /// Each layout's token and vectors; diffusers' pickled .bin reads as its safetensors twin.
    #[test]
    fn layouts_name_their_tokens() {
        let dir = fixture("sd_tiny_embeddings");
        let single = TextualInversion::read(&dir.join("cat-toy.safetensors"), None).unwrap();
        assert_eq!((single.token.as_str(), single.tables[0].1), ("<cat-toy>", [1, 32]));
        assert_eq!(TextualInversion::read(&dir.join("cat-toy.bin"), None).unwrap(), single);
        let a1111 = TextualInversion::read(&dir.join("bad-hands.safetensors"), None).unwrap();
        assert_eq!(a1111.tokens(0), ["bad-hands", "bad-hands_1", "bad-hands_2"]);
        let named = TextualInversion::read(&dir.join("bad-hands.safetensors"), Some("<bh>")).unwrap();
        assert_eq!(named.token, "<bh>");
        let xl = TextualInversion::read(&dir.join("xl-style.safetensors"), None).unwrap();
        assert_eq!(xl.tables.len(), 2);
        for bad in [Some("two words"), Some("")] {
            assert!(TextualInversion::read(&dir.join("cat-toy.safetensors"), bad).is_err());
        }
        let err = TextualInversion::read(&dir.join("io.json"), None).unwrap_err();
        assert!(err.to_string().contains(".safetensors"), "{err}");
        let err = TextualInversion::read(&dir.join("io.safetensors"), None).unwrap_err();
        assert!(err.to_string().contains("expected one"), "{err}");
    }
}
