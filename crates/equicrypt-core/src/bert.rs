//! The transform plan for BERT-style encoders in transformers format (`model_type` `bert`:
//! all-MiniLM-L6-v2 and other sentence-transformers models), post-LayerNorm.
//!
//! Rules (see `docs/encoders.md`):
//! - vocabulary permutation on the rows of the word embedding (the client encrypts token ids with
//!   the same [`VocabPermutation`] as for decoders);
//! - one hidden permutation σ on the columns of the word, position and token-type embeddings, on
//!   every LayerNorm's gain and bias (LayerNorm's mean and variance are sums over the hidden
//!   axis, which a permutation leaves unchanged), on the input columns of Q, K, V and the FFN's
//!   first layer, on the output rows (and biases) of the attention output and the FFN's second
//!   layer, and on the pooler's rows and columns;
//! - per layer a head permutation shared by Q, K and V (a head's attention weights must meet its
//!   own values), with a within-head permutation of the Q/K dims shared by Q and K (it leaves
//!   every `q·k` unchanged) and another of the V dims, mirrored on the attention output's input
//!   columns;
//! - per layer an FFN permutation on the intermediate rows, bias and the second layer's columns.
//!
//! No sign flips: LayerNorm subtracts the mean, which does not commute with negating
//! coordinates. The encoder's outputs (`last_hidden_state`, pooled and normalized sentence
//! embeddings) come out σ-permuted: [`BertPlan::decrypt_hidden`] undoes it. σ is orthogonal, so
//! dot products and cosine similarities of encrypted embeddings equal the plaintext ones.
//!
//! Float weights only: sums over permuted axes run in another order, so outputs agree to
//! rounding, not bit for bit.

use crate::config::{meta_str, meta_usize, opt_meta_usize, ConfigError, MetadataSource};
use crate::{CoreError, Permutation, SecretKey, TensorTransform, VocabPermutation};

/// `model_type` values of this family.
pub const BERT_MODEL_TYPES: [&str; 1] = ["bert"];

/// Hyper-parameters of a BERT encoder, read once from `config.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BertConfig {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub d_model: usize,
    /// FFN intermediate size.
    pub d_ff: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Vocabulary size (rows of the word embedding).
    pub vocab_size: usize,
    /// Positions (rows of the position embedding).
    pub max_position: usize,
    /// Token types (rows of the token-type embedding).
    pub type_vocab: usize,
}

impl BertConfig {
    /// Reads and validates a `config.json` of `model_type` `bert`.
    pub fn read(meta: &dyn MetadataSource) -> Result<Self, ConfigError> {
        let model_type = meta_str(meta, "model_type")?;
        if !BERT_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(ConfigError::UnsupportedArchitecture { arch: model_type });
        }
        let c = Self {
            n_layer: meta_usize(meta, "num_hidden_layers")?,
            d_model: meta_usize(meta, "hidden_size")?,
            d_ff: meta_usize(meta, "intermediate_size")?,
            n_head: meta_usize(meta, "num_attention_heads")?,
            vocab_size: meta_usize(meta, "vocab_size")?,
            max_position: opt_meta_usize(meta, "max_position_embeddings")?.unwrap_or(512),
            type_vocab: opt_meta_usize(meta, "type_vocab_size")?.unwrap_or(2),
        };
        if let Some(pet) = crate::config::opt_meta_str(meta, "position_embedding_type")? {
            if pet != "absolute" {
                return Err(ConfigError::InvalidConfig(format!(
                    "position_embedding_type '{pet}' (only 'absolute' is supported)"
                )));
            }
        }
        if c.n_layer == 0 || c.d_model == 0 || c.d_ff == 0 || c.vocab_size == 0 {
            return Err(ConfigError::InvalidConfig(
                "num_hidden_layers, hidden_size, intermediate_size and vocab_size must be > 0"
                    .into(),
            ));
        }
        if c.n_head == 0 || !c.d_model.is_multiple_of(c.n_head) {
            return Err(ConfigError::InvalidConfig(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.d_model, c.n_head
            )));
        }
        Ok(c)
    }

    /// Dimensions of one head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_head
    }
}

/// Transforms of one encoder block.
#[derive(Clone, Debug)]
struct BertLayer {
    /// New position of every Q and K row (head move plus within-head Q/K dims).
    qk: Permutation,
    /// New position of every V row, and of every attention-output column.
    vo: Permutation,
    /// FFN intermediate permutation.
    ffn: Permutation,
}

/// The key-derived plan for one BERT encoder.
#[derive(Clone, Debug)]
pub struct BertPlan {
    /// Configuration the plan was made for.
    pub config: BertConfig,
    /// Token id permutation (the decoders' derivation: one client for both).
    pub vocab: VocabPermutation,
    /// The hidden permutation σ: plaintext coordinate `i` sits at `σ(i)` in the encrypted model.
    pub hidden: Permutation,
    layers: Vec<BertLayer>,
}

impl BertPlan {
    /// Derives the plan of `key` for `config`. Every permutation comes from its own labelled
    /// stream of the key (`bert/hidden`, `bert/layer/N/{heads,qk/H,v/H,ffn}`).
    pub fn derive(key: &SecretKey, config: BertConfig) -> Result<Self, CoreError> {
        let hd = config.head_dim();
        let vocab = VocabPermutation::derive(key, config.vocab_size);
        let hidden = Permutation::random(config.d_model, &mut key.stream("bert/hidden"));
        let layers = (0..config.n_layer)
            .map(|l| {
                let heads = Permutation::random(
                    config.n_head,
                    &mut key.stream(&format!("bert/layer/{l}/heads")),
                );
                let inner = |what: &str| -> Vec<Permutation> {
                    (0..config.n_head)
                        .map(|h| {
                            Permutation::random(
                                hd,
                                &mut key.stream(&format!("bert/layer/{l}/{what}/{h}")),
                            )
                        })
                        .collect()
                };
                BertLayer {
                    qk: Permutation::blocked(&heads, &inner("qk")),
                    vo: Permutation::blocked(&heads, &inner("v")),
                    ffn: Permutation::random(
                        config.d_ff,
                        &mut key.stream(&format!("bert/layer/{l}/ffn")),
                    ),
                }
            })
            .collect();
        Ok(Self {
            config,
            vocab,
            hidden,
            layers,
        })
    }

    /// The transform of the tensor called `name` (transformers' `BertModel` names, with or
    /// without a `bert.` prefix); [`CoreError::UnsupportedTensor`] for a name the plan does not
    /// know (a task head, say), so that nothing unencrypted slips through.
    pub fn transform_for(&self, name: &str) -> Result<TensorTransform, CoreError> {
        let unknown = || CoreError::UnsupportedTensor(name.to_string());
        let n = name.strip_prefix("bert.").unwrap_or(name);
        let s = &self.hidden;
        let rows_cols = |rows: &Permutation, cols: &Permutation| TensorTransform {
            rows: Some(rows.clone()),
            cols: Some(cols.clone()),
            ..TensorTransform::default()
        };
        let cols = |cols: &Permutation| TensorTransform {
            cols: Some(cols.clone()),
            ..TensorTransform::default()
        };
        match n {
            "embeddings.word_embeddings.weight" => return Ok(rows_cols(&self.vocab.0, s)),
            "embeddings.position_embeddings.weight"
            | "embeddings.token_type_embeddings.weight"
            | "embeddings.LayerNorm.weight"
            | "embeddings.LayerNorm.bias"
            | "pooler.dense.bias" => return Ok(cols(s)),
            "pooler.dense.weight" => return Ok(rows_cols(s, s)),
            // A buffer of position indices (older checkpoints): not a weight.
            "embeddings.position_ids" => return Ok(TensorTransform::default()),
            _ => {}
        }
        let rest = n.strip_prefix("encoder.layer.").ok_or_else(unknown)?;
        let (layer, suffix) = rest.split_once('.').ok_or_else(unknown)?;
        if layer.is_empty() || (layer.len() > 1 && layer.starts_with('0')) {
            return Err(unknown());
        }
        let lt = layer
            .parse::<usize>()
            .ok()
            .and_then(|l| self.layers.get(l))
            .ok_or_else(unknown)?;
        Ok(match suffix {
            "attention.self.query.weight" | "attention.self.key.weight" => rows_cols(&lt.qk, s),
            "attention.self.query.bias" | "attention.self.key.bias" => cols(&lt.qk),
            "attention.self.value.weight" => rows_cols(&lt.vo, s),
            "attention.self.value.bias" => cols(&lt.vo),
            "attention.output.dense.weight" => rows_cols(s, &lt.vo),
            "intermediate.dense.weight" => rows_cols(&lt.ffn, s),
            "intermediate.dense.bias" => cols(&lt.ffn),
            "output.dense.weight" => rows_cols(s, &lt.ffn),
            "attention.output.dense.bias"
            | "attention.output.LayerNorm.weight"
            | "attention.output.LayerNorm.bias"
            | "output.dense.bias"
            | "output.LayerNorm.weight"
            | "output.LayerNorm.bias" => cols(s),
            _ => return Err(unknown()),
        })
    }

    /// An encrypted hidden vector (a `last_hidden_state` row, a pooled or normalized sentence
    /// embedding) back in plaintext coordinates: `plain[i] = enc[σ(i)]`.
    pub fn decrypt_hidden(&self, enc: &[f32]) -> Result<Vec<f32>, CoreError> {
        if enc.len() != self.hidden.len() {
            return Err(CoreError::UnsupportedShape(format!(
                "a hidden vector has {} values, the model {}",
                enc.len(),
                self.hidden.len()
            )));
        }
        Ok((0..enc.len())
            .map(|i| enc[self.hidden.apply(i as u32) as usize])
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BertConfig {
        BertConfig {
            n_layer: 2,
            d_model: 12,
            d_ff: 20,
            n_head: 3,
            vocab_size: 50,
            max_position: 16,
            type_vocab: 2,
        }
    }

    #[test]
    fn plan_is_deterministic_and_key_dependent() {
        let k1 = SecretKey::from_bytes([1; 32]);
        let k2 = SecretKey::from_bytes([2; 32]);
        let a = BertPlan::derive(&k1, config()).unwrap();
        let b = BertPlan::derive(&k1, config()).unwrap();
        let c = BertPlan::derive(&k2, config()).unwrap();
        assert_eq!(a.hidden.forward(), b.hidden.forward());
        assert_ne!(a.hidden.forward(), c.hidden.forward());
        assert!(!a.hidden.is_identity());
    }

    #[test]
    fn heads_move_together_in_q_k_and_v() {
        let p = BertPlan::derive(&SecretKey::from_bytes([7; 32]), config()).unwrap();
        let hd = p.config.head_dim();
        for l in &p.layers {
            for i in 0..p.config.d_model {
                let (q, v) = (l.qk.apply(i as u32) as usize, l.vo.apply(i as u32) as usize);
                assert_eq!(q / hd, v / hd, "row {i}: Q and V land in different heads");
            }
        }
    }

    #[test]
    fn names_map_and_unknown_tensors_are_refused() {
        let p = BertPlan::derive(&SecretKey::from_bytes([3; 32]), config()).unwrap();
        for name in [
            "embeddings.word_embeddings.weight",
            "bert.embeddings.LayerNorm.bias",
            "encoder.layer.1.attention.self.key.weight",
            "encoder.layer.0.output.LayerNorm.weight",
            "pooler.dense.weight",
        ] {
            assert!(!p.transform_for(name).unwrap().is_identity(), "{name}");
        }
        assert!(p
            .transform_for("embeddings.position_ids")
            .unwrap()
            .is_identity());
        for bad in [
            "encoder.layer.2.output.dense.weight",
            "encoder.layer.01.output.dense.weight",
            "classifier.weight",
            "encoder.layer.0.attention.self.rotary",
        ] {
            assert!(
                matches!(p.transform_for(bad), Err(CoreError::UnsupportedTensor(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn decrypt_hidden_inverts_the_placement() {
        let p = BertPlan::derive(&SecretKey::from_bytes([9; 32]), config()).unwrap();
        let plain: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let enc = p.hidden.permute(&plain);
        assert_eq!(p.decrypt_hidden(&enc).unwrap(), plain);
        assert!(p.decrypt_hidden(&plain[..5]).is_err());
    }
}
