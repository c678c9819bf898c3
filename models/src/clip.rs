//! The Stable Diffusion text encoder: transformers' `CLIPTextModel` (Radford et al. 2021,
//! "Learning Transferable Visual Models From Natural Language Supervision") and its BPE
//! tokenizer.
//!
//! Mirrors `transformers/models/clip/modeling_clip.py` (`CLIPTextEmbeddings`, `CLIPAttention`,
//! `CLIPMLP`, `CLIPEncoderLayer`, `CLIPTextTransformer`) and `tokenization_clip.py` (v4.40+/v5):
//! token + position embeddings, pre-norm causal self-attention blocks with quick-GELU MLPs, a
//! final LayerNorm; `CLIPTextModelWithProjection` (SDXL's second encoder) adds a projection of the
//! pooled output. The tokenizer is the checkpoint's own `tokenizer.json`, run by the
//! `tokenizers` crate, then truncated/padded to 77 ids as SD pipelines do.

use std::path::Path;

use crate::activation::{gelu_exact, sigmoid_exact};
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::attention::multi_head_attention;
use crate::load::{find_weights, load_safetensors, read_config, KeyMap, LoadError};
use crate::norm::layer_norm;

/// transformers' `CLIPTextConfig`, deserialised from `text_encoder/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Vocabulary size (49408).
    pub vocab_size: usize,
    /// Width (768 in SD 1.x, 1024 in SD 2.x).
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers (12; 23 in SD 2.x, which drops OpenCLIP's last layer).
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Context length (77).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu` (OpenCLIP).
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Start-of-text id.
    pub bos_token_id: i64,
    /// End-of-text id (its first position gives the pooled output).
    pub eos_token_id: i64,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// Width of the pooled output's projection (`CLIPTextModelWithProjection`).
    pub projection_dim: Option<usize>,
    /// The transformers class the checkpoint was saved from: `CLIPTextModelWithProjection`
    /// has a `text_projection`, `CLIPTextModel` none.
    pub architectures: Option<Vec<String>>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            bos_token_id: 49406,
            eos_token_id: 49407,
            pad_token_id: Some(1),
            projection_dim: None,
            architectures: None,
        }
    }
}

impl ClipTextConfig {
    /// Whether the checkpoint is a `CLIPTextModelWithProjection` (it then needs a
    /// `projection_dim`).
    pub fn with_projection(&self) -> bool {
        self.architectures
            .iter()
            .flatten()
            .any(|a| a == "CLIPTextModelWithProjection")
    }

    /// Builds the encoder with random weights (load real ones with [`load_clip_text`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ClipTextModel<B>, LoadError> {
        let quick_gelu = match self.hidden_act.as_str() {
            "quick_gelu" => true,
            "gelu" => false,
            other => return Err(LoadError::Unsupported(format!("CLIP hidden_act {other:?}"))),
        };
        let d = self.hidden_size;
        if !d.is_multiple_of(self.num_attention_heads) {
            return Err(LoadError::Unsupported(format!(
                "hidden_size {d} not divisible by num_attention_heads {}",
                self.num_attention_heads
            )));
        }
        let text_projection = match (self.with_projection(), self.projection_dim) {
            (false, _) => None,
            (true, Some(p)) => Some(LinearConfig::new(d, p).with_bias(false).init(device)),
            (true, None) => {
                return Err(LoadError::Unsupported(
                    "CLIPTextModelWithProjection without projection_dim".into(),
                ))
            }
        };
        let norm = || LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device);
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                layer_norm1: norm(),
                self_attn: ClipAttention {
                    q_proj: linear(d, d),
                    k_proj: linear(d, d),
                    v_proj: linear(d, d),
                    out_proj: linear(d, d),
                    heads: self.num_attention_heads,
                },
                layer_norm2: norm(),
                mlp: ClipMlp {
                    fc1: linear(d, self.intermediate_size),
                    fc2: linear(self.intermediate_size, d),
                    quick_gelu,
                },
            })
            .collect();
        Ok(ClipTextModel {
            embeddings: ClipTextEmbeddings {
                token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d).init(device),
            },
            encoder: ClipEncoder { layers },
            final_layer_norm: norm(),
            text_projection,
            eos_token_id: self.eos_token_id,
        })
    }
}

/// `text_model.embeddings`: token and learned absolute position embeddings.
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings<B: Backend> {
    /// `[vocab, d]`.
    pub token_embedding: Embedding<B>,
    /// `[max_positions, d]`.
    pub position_embedding: Embedding<B>,
}

/// `CLIPAttention` with a causal mask (the text encoder's only use).
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    /// Query projection.
    pub q_proj: Linear<B>,
    /// Key projection.
    pub k_proj: Linear<B>,
    /// Value projection.
    pub v_proj: Linear<B>,
    /// Output projection.
    pub out_proj: Linear<B>,
    /// Number of heads.
    pub heads: usize,
}

/// `CLIPMLP`: `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    /// Up projection.
    pub fc1: Linear<B>,
    /// Down projection.
    pub fc2: Linear<B>,
    /// `quick_gelu` (`x·σ(1.702x)`) when true, exact GELU otherwise.
    pub quick_gelu: bool,
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    /// Norm before attention.
    pub layer_norm1: LayerNorm<B>,
    /// Causal self-attention.
    pub self_attn: ClipAttention<B>,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm<B>,
    /// MLP.
    pub mlp: ClipMlp<B>,
}

/// `text_model.encoder`.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    /// `layers.{i}`.
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// The outputs of [`ClipTextModel::forward`].
#[derive(Debug, Clone)]
pub struct ClipTextOutput<B: Backend> {
    /// After the final LayerNorm: the UNet's `encoder_hidden_states`. `[batch, seq, d]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// The state at each sequence's first end-of-text token. `[batch, d]`.
    pub pooler_output: Tensor<B, 2>,
    /// The embeddings' output, then each layer's (before the final LayerNorm), as
    /// transformers' `output_hidden_states`: `num_hidden_layers + 1` of `[batch, seq, d]`.
    /// SDXL conditions on the penultimate, `hidden_states[len − 2]`.
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// `text_projection(pooler_output)`, `[batch, projection_dim]`, for a model with a
    /// projection (transformers' `text_embeds`).
    pub text_embeds: Option<Tensor<B, 2>>,
}

/// transformers' `CLIPTextModel` (its `text_model`; the `text_model.` key prefix is renamed
/// away on load).
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    /// Token and position embeddings.
    pub embeddings: ClipTextEmbeddings<B>,
    /// The transformer layers.
    pub encoder: ClipEncoder<B>,
    /// Final LayerNorm.
    pub final_layer_norm: LayerNorm<B>,
    /// The pooled output's projection (`CLIPTextModelWithProjection`; no bias).
    pub text_projection: Option<Linear<B>>,
    /// End-of-text id, for the pooled output.
    pub eos_token_id: i64,
}

impl<B: Backend> ClipTextModel<B> {
    /// Encodes token ids (from [`ClipTokenizer::encode`]).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`, `seq ≤ max_position_embeddings`
    /// - output: see [`ClipTextOutput`]
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> ClipTextOutput<B> {
        let [b, seq] = input_ids.dims();
        let device = input_ids.device();
        // 1. embeddings.
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device).reshape([1, seq]);
        let mut h = self.embeddings.token_embedding.forward(input_ids.clone())
            + self.embeddings.position_embedding.forward(positions);
        // 2. causal pre-norm transformer layers.
        let mut hidden_states = Vec::with_capacity(self.encoder.layers.len() + 1);
        for layer in &self.encoder.layers {
            hidden_states.push(h.clone());
            let a = &layer.self_attn;
            let x = layer_norm(&layer.layer_norm1, h.clone());
            let attn = multi_head_attention(
                a.q_proj.forward(x.clone()),
                a.k_proj.forward(x.clone()),
                a.v_proj.forward(x),
                a.heads,
                true,
            );
            h = h + a.out_proj.forward(attn);
            let x = layer.mlp.fc1.forward(layer_norm(&layer.layer_norm2, h.clone()));
            let x = if layer.mlp.quick_gelu {
                x.clone() * sigmoid_exact(x * 1.702)
            } else {
                gelu_exact(x)
            };
            h = h + layer.mlp.fc2.forward(x);
        }
        hidden_states.push(h.clone());
        // 3. final norm and pooled output at the first end-of-text token (transformers' rule
        //    for configs whose eos_token_id is not the legacy 2).
        let last = layer_norm(&self.final_layer_norm, h);
        let ids = input_ids
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap_or_default();
        let rows: Vec<i64> = (0..b)
            .map(|i| {
                let row = &ids[i * seq..(i + 1) * seq];
                let pos = if self.eos_token_id == 2 {
                    row.iter()
                        .enumerate()
                        .max_by_key(|(j, v)| (**v, std::cmp::Reverse(*j)))
                        .map(|(j, _)| j)
                } else {
                    row.iter().position(|&v| v == self.eos_token_id)
                };
                (i * seq + pos.unwrap_or(0)) as i64
            })
            .collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b]), &device);
        let d = last.dims()[2];
        let pooled = last.clone().reshape([b * seq, d]).select(0, index);
        ClipTextOutput {
            last_hidden_state: last,
            text_embeds: self.text_projection.as_ref().map(|p| p.forward(pooled.clone())),
            pooler_output: pooled,
            hidden_states,
        }
    }
}

/// Key renames for transformers' CLIP text checkpoints: drop the `text_model.` prefix; the
/// `position_ids` buffer of older files is not a parameter.
pub fn clip_key_map() -> KeyMap {
    KeyMap::new().rename(r"^text_model\.", "").ignore(r"position_ids$")
}

/// Loads a transformers text-encoder directory (`config.json` and `model[.fp16].safetensors`,
/// as in a pipeline's `text_encoder/` folder).
pub fn load_clip_text<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
) -> Result<(ClipTextConfig, ClipTextModel<B>), LoadError> {
    let dir = dir.as_ref();
    let config: ClipTextConfig = read_config(dir.join("config.json"))?;
    let model = config.init(device)?;
    let weights = find_weights(dir, &["model.safetensors", "model.fp16.safetensors"])?;
    let model = load_safetensors(model, weights, &clip_key_map())?;
    Ok((config, model))
}

/// The CLIP BPE tokenizer as SD pipelines call it: `tokenizer(prompt, padding="max_length",
/// max_length=77, truncation=True)`.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// Start-of-text id.
    pub bos_id: u32,
    /// End-of-text id.
    pub eos_id: u32,
    /// Padding id (`<|endoftext|>` in SD 1.x, `!` in SD 2.x).
    pub pad_id: u32,
    /// Output length (77).
    pub max_length: usize,
    /// Tokens added by textual inversions ([`add_tokens`](Self::add_tokens)), in order.
    added: Vec<String>,
}

#[derive(Deserialize)]
struct TokenizerConfig {
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    pad_token: Option<SpecialToken>,
    unk_token: Option<SpecialToken>,
    model_max_length: Option<f64>,
}

/// transformers writes special tokens either as strings or as `{"content": ...}` objects.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Plain(String),
    Added { content: String },
}

impl SpecialToken {
    fn content(&self) -> &str {
        match self {
            SpecialToken::Plain(s) | SpecialToken::Added { content: s } => s,
        }
    }
}

/// The CLIP tokenizer of `vocab.json` + `merges.txt`, assembled as the `tokenizer.json` that
/// transformers' `CLIPConverter` writes (NFC, whitespace collapse and lowercase; CLIP's split
/// pattern then byte-level; BPE with the `</w>` word suffix; `bos … eos` around the tokens), so
/// both layouts tokenize identically.
fn clip_bpe_from_files(dir: &Path, bos: &str, eos: &str, unk: &str) -> Result<tokenizers::Tokenizer, LoadError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| LoadError::Io { path, source })
    };
    let vocab_path = dir.join("vocab.json");
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&read("vocab.json")?).map_err(|source| LoadError::Config {
            path: vocab_path.clone(),
            source,
        })?;
    let merges_text = read("merges.txt")?;
    let merges: Vec<&str> = merges_text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .collect();
    let id = |token: &str| {
        vocab
            .get(token)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| LoadError::Corrupt {
                path: vocab_path.clone(),
                format: "vocab.json",
                message: format!("special token {token:?} is not in the vocabulary"),
            })
    };
    let added = |token: &str| -> Result<serde_json::Value, LoadError> {
        Ok(serde_json::json!({
            "id": id(token)?, "content": token, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }))
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(bos)?, added(eos)?],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, id(eos)?], "cls": [bos, id(bos)?],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    json.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| LoadError::Corrupt {
            path: dir.join("merges.txt"),
            format: "vocab.json + merges.txt",
            message: e.to_string(),
        })
}

impl ClipTokenizer {
    /// Loads a pipeline's `tokenizer/` folder: `tokenizer.json`, or else `vocab.json` +
    /// `merges.txt` (how SD 1.x repositories ship it), and, if present, `tokenizer_config.json`
    /// or `special_tokens_map.json` (special tokens, `model_max_length`).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, LoadError> {
        let dir = dir.as_ref();
        let config: Option<TokenizerConfig> = ["tokenizer_config.json", "special_tokens_map.json"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .map(read_config)
            .transpose()?;
        let json = dir.join("tokenizer.json");
        let (path, tokenizer) = if json.is_file() || !dir.join("vocab.json").is_file() {
            let tokenizer = tokenizers::Tokenizer::from_file(&json).map_err(|e| LoadError::Corrupt {
                path: json.clone(),
                format: "tokenizer.json",
                message: e.to_string(),
            })?;
            (json, tokenizer)
        } else {
            let special = |t: Option<&SpecialToken>, default: &'static str| {
                t.map_or(default.to_string(), |t| t.content().to_string())
            };
            let c = config.as_ref();
            let bos = special(c.and_then(|c| c.bos_token.as_ref()), "<|startoftext|>");
            let eos = special(c.and_then(|c| c.eos_token.as_ref()), "<|endoftext|>");
            let unk = special(c.and_then(|c| c.unk_token.as_ref()), "<|endoftext|>");
            (dir.join("vocab.json"), clip_bpe_from_files(dir, &bos, &eos, &unk)?)
        };
        let id = |token: Option<&SpecialToken>, default: &str| -> Result<u32, LoadError> {
            let name = token.map(SpecialToken::content).unwrap_or(default);
            tokenizer.token_to_id(name).ok_or_else(|| LoadError::Corrupt {
                path: path.clone(),
                format: "tokenizer",
                message: format!("special token {name:?} is not in the vocabulary"),
            })
        };
        let c = config.as_ref();
        let eos_id = id(c.and_then(|c| c.eos_token.as_ref()), "<|endoftext|>")?;
        Ok(Self {
            bos_id: id(c.and_then(|c| c.bos_token.as_ref()), "<|startoftext|>")?,
            eos_id,
            pad_id: match c.and_then(|c| c.pad_token.as_ref()) {
                Some(t) => id(Some(t), "")?,
                None => eos_id,
            },
            max_length: c
                .and_then(|c| c.model_max_length)
                .filter(|m| (2.0..=4096.0).contains(m))
                .map_or(77, |m| m as usize),
            tokenizer,
            added: Vec::new(),
        })
    }

    /// Adds `tokens` to the vocabulary (as transformers' `add_tokens`: matched in the
    /// normalised text before BPE) and returns their ids, which follow the vocabulary's. A token
    /// the vocabulary already has is an error, as in diffusers.
    pub fn add_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>, LoadError> {
        for token in tokens {
            if self.tokenizer.token_to_id(token).is_some() {
                return Err(LoadError::Unsupported(format!(
                    "token {token:?} is already in the tokenizer's vocabulary"
                )));
            }
        }
        let added: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .map(|t| tokenizers::AddedToken::from(t.clone(), false))
            .collect();
        self.tokenizer.add_tokens(&added);
        self.added.extend(tokens.iter().cloned());
        tokens
            .iter()
            .map(|t| {
                self.tokenizer
                    .token_to_id(t)
                    .ok_or_else(|| LoadError::Unsupported(format!("token {t:?} could not be added")))
            })
            .collect()
    }

    /// `prompt` with each multi-vector textual-inversion token it names expanded to all its
    /// tokens (`tok` → `tok tok_1 tok_2`), as diffusers' `maybe_convert_prompt` does before
    /// tokenizing (replacing every occurrence of the text, as it does).
    pub fn convert_prompt(&self, prompt: &str) -> Result<String, LoadError> {
        if self.added.is_empty() {
            return Ok(prompt.to_string());
        }
        let ids = self.body_ids(prompt)?;
        let mut prompt = prompt.to_string();
        for token in &self.added {
            let Some(id) = self.tokenizer.token_to_id(token) else {
                continue;
            };
            let mut replacement = token.clone();
            let mut i = 1;
            while self.added.contains(&format!("{token}_{i}")) {
                replacement.push_str(&format!(" {token}_{i}"));
                i += 1;
            }
            if i > 1 && ids.contains(&id) {
                prompt = prompt.replace(token, &replacement);
            }
        }
        Ok(prompt)
    }

    /// The prompt's own token ids, without start, end or padding.
    fn body_ids(&self, prompt: &str) -> Result<Vec<u32>, LoadError> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| LoadError::Unsupported(format!("cannot tokenize {prompt:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `[bos] + tokens (truncated to max_length − 2) + [eos] + padding`: exactly
    /// `max_length` ids, of the prompt with its multi-vector textual-inversion tokens expanded
    /// ([`convert_prompt`](Self::convert_prompt)).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, LoadError> {
        let body = self.body_ids(&self.convert_prompt(prompt)?)?;
        let body = &body[..body.len().min(self.max_length - 2)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(body);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// Encodes a batch of prompts into an id tensor.
    ///
    /// # Shapes
    /// - output: `[prompts.len(), max_length]`
    pub fn encode_batch<B: Backend>(
        &self,
        prompts: &[&str],
        device: &B::Device,
    ) -> Result<Tensor<B, 2, Int>, LoadError> {
        let mut ids = Vec::with_capacity(prompts.len() * self.max_length);
        for p in prompts {
            ids.extend(self.encode(p)?.into_iter().map(i64::from));
        }
        Ok(Tensor::from_data(
            TensorData::new(ids, [prompts.len(), self.max_length]),
            device,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fixture, rel_err, Io, TestBackend};

    #[test]
    fn clip_tiny_matches_transformers() {
        let device = Default::default();
        let (_, clip) = load_clip_text::<TestBackend>(fixture("clip_tiny"), &device).expect("fixture loads");
        let io = Io::open("clip_tiny");
        let out = clip.forward(io.int::<TestBackend, 2>("input_ids", &device));
        let last = rel_err(&out.last_hidden_state.into_data(), &io.data("last_hidden_state"));
        let pooled = rel_err(&out.pooler_output.into_data(), &io.data("pooler_output"));
        eprintln!("clip_tiny: last_hidden_state rel err {last:.2e}, pooler_output rel err {pooled:.2e}");
        assert!(last <= 1e-4, "last_hidden_state rel err {last}");
        assert!(pooled <= 1e-4, "pooler_output rel err {pooled}");
    }

    /// `CLIPTextModelWithProjection` (SDXL's second encoder): exact GELU, the end token found
    /// by argmax (eos_token_id 2), `!` as padding, the projected pooled output and the
    /// penultimate hidden state.
    #[test]
    fn clip_with_projection_matches_transformers() {
        let device = Default::default();
        let dir = fixture("sdxl_tiny/text_encoder_2");
        let (config, clip) = load_clip_text::<TestBackend>(&dir, &device).expect("fixture loads");
        assert!(config.with_projection() && config.hidden_act == "gelu" && config.eos_token_id == 2);
        let io = Io::open("sdxl_tiny/text_encoder_2");
        let out = clip.forward(io.int::<TestBackend, 2>("input_ids", &device));
        assert_eq!(out.hidden_states.len(), config.num_hidden_layers + 1);
        let penultimate = out.hidden_states[config.num_hidden_layers - 1].clone();
        let errs = [
            (
                "last_hidden_state",
                rel_err(&out.last_hidden_state.into_data(), &io.data("last_hidden_state")),
            ),
            (
                "penultimate",
                rel_err(&penultimate.into_data(), &io.data("penultimate")),
            ),
            (
                "text_embeds",
                rel_err(
                    &out.text_embeds.expect("projected").into_data(),
                    &io.data("text_embeds"),
                ),
            ),
        ];
        for (name, err) in errs {
            eprintln!("sdxl_tiny/text_encoder_2: {name} rel err {err:.2e}");
            assert!(err <= 1e-4, "{name} rel err {err}");
        }
        // Read as a plain CLIPTextModel, the checkpoint's projection is an unexpected key.
        let mut plain = config.clone();
        plain.architectures = None;
        let model = plain.init::<TestBackend>(&device).unwrap();
        let err = load_safetensors(model, dir.join("model.safetensors"), &clip_key_map()).unwrap_err();
        assert!(err.to_string().contains("text_projection"), "{err}");
    }

    #[test]
    fn vocab_and_merges_tokenize_like_transformers() {
        // The SD 1.x layout: vocab.json + merges.txt + special_tokens_map.json, no tokenizer.json.
        #[derive(Deserialize)]
        struct Expected {
            prompts: Vec<String>,
            input_ids: Vec<Vec<u32>>,
        }
        let expected: Expected = read_config(fixture("sd_tiny/tokens.json")).unwrap();
        let dir = fixture("sd_tiny/tokenizer");
        assert!(!dir.join("tokenizer.json").exists());
        let tokenizer = ClipTokenizer::from_dir(&dir).expect("vocab.json + merges.txt load");
        for (prompt, ids) in expected.prompts.iter().zip(&expected.input_ids) {
            assert_eq!(&tokenizer.encode(prompt).unwrap(), ids, "prompt {prompt:?}");
        }
        // A folder with neither layout is a typed error naming tokenizer.json.
        let err = ClipTokenizer::from_dir(fixture("vae_tiny")).expect_err("no tokenizer there");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn tokenizer_matches_transformers_on_tricky_prompts() {
        #[derive(Deserialize)]
        struct Expected {
            prompts: Vec<String>,
            input_ids: Vec<Vec<u32>>,
        }
        let tok = ClipTokenizer::from_dir(fixture("clip_tiny")).expect("tokenizer loads");
        let expected: Expected = read_config(fixture("clip_tiny/tokens.json")).unwrap();
        for (prompt, ids) in expected.prompts.iter().zip(&expected.input_ids) {
            assert_eq!(&tok.encode(prompt).unwrap(), ids, "prompt {prompt:?}");
        }
    }

    #[test]
    fn tokenizer_ids_drive_the_encoder() {
        let device = Default::default();
        let tok = ClipTokenizer::from_dir(fixture("clip_tiny")).unwrap();
        let (_, clip) = load_clip_text::<TestBackend>(fixture("clip_tiny"), &device).unwrap();
        let io = Io::open("clip_tiny");
        let ids = tok
            .encode_batch::<TestBackend>(&["a photo of the cat", "café naïve résumé, 東京 and 🐱🚀"], &device)
            .unwrap();
        let expected = io.int::<TestBackend, 2>("input_ids", &device);
        assert_eq!(ids.to_data().convert::<i64>(), expected.to_data().convert::<i64>());
        let last = clip.forward(ids).last_hidden_state;
        assert!(rel_err(&last.into_data(), &io.data("last_hidden_state")) <= 1e-4);
    }
}
