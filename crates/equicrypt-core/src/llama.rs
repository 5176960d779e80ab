//! The transform plan for LLaMA-family decoders (GGUF architecture `llama`).
//!
//! Rules (numbers refer to `docs/ee-math.md`):
//! - vocabulary permutation on embedding rows and head rows (rule 9);
//! - one residual permutation on every tensor that reads or writes the residual stream, and on
//!   the RMSNorm gains (rules 1, 4);
//! - per layer an FFN permutation on gate/up rows and down columns (rule 3);
//! - per layer a head permutation that moves each kv head with its group of query heads, and
//!   shuffles query heads inside the group (rule 7);
//! - per kv head a permutation of V's output dims with the same map on O's input columns (rule 7);
//! - per kv head a sign flip of whole RoPE pairs `(2i, 2i+1)` on Q and K rows (rule 8): the only
//!   lossless transform of Q/K head dims that commutes with RoPE.
//!
//! Three modes trade key space for exactness (see `docs/ee-math.md`, "Exactness by engine"):
//! - [`PermMode::Stock`] (the default) keeps every permuted input axis inside aligned groups of
//!   [`LANE_GROUP`] = 4 values and leaves heads in place. Stock llama.cpp's x86 kernels (AVX2, and
//!   the scalar path) add the four int8 products of each aligned 4-group into one 32-bit integer
//!   lane before any floating-point step, so a permutation inside those groups leaves every float
//!   operation unchanged: bit-identical logits on stock llama.cpp *and* in our engine.
//! - [`PermMode::Exact`] keeps every permuted input axis *inside* its aligned 32-value groups and
//!   leaves heads in place, so that every floating-point reduction over a permuted axis runs in the
//!   same order in an engine that sums integers across a whole block (ours): bit-identical there,
//!   equal only to rounding on stock llama.cpp (its lanes change).
//! - [`PermMode::Full`] also moves whole 32-blocks and heads: a larger key space, but the reduction
//!   order changes, so logits agree only to rounding in every engine.

use crate::families::{ArchFamily, LlamaFamily, TensorRole};
use crate::{CoreError, LlamaConfig, Permutation, SecretKey};

/// Values per quantization block along a tensor's input axis (Q4_0 … Q8_0).
pub const QUANT_BLOCK: usize = 32;

/// Values whose products stock llama.cpp's x86 quantized dot products sum as integers in one SIMD
/// lane (`maddubs` + `madd`: four adjacent int8 products per 32-bit lane) before any float
/// operation: the permutation group of [`PermMode::Stock`].
pub const LANE_GROUP: usize = 4;

/// Which part of the key space a plan draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PermMode {
    /// Permutations inside aligned [`LANE_GROUP`]-value groups only, heads fixed: bit-exact in our
    /// engine and in stock llama.cpp (x86 AVX2 and scalar kernels). The default.
    #[default]
    Stock,
    /// Permutations inside aligned 32-value groups only, heads fixed: bit-exact in an engine whose
    /// reductions over permuted axes are order-independent inside a block (ours).
    Exact,
    /// Also moves whole blocks and heads: larger key space, logits equal only to rounding.
    Full,
}

impl PermMode {
    /// The name stored in encrypted model metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            PermMode::Stock => "perm-stock",
            PermMode::Exact => "perm-exact",
            PermMode::Full => "perm-full",
        }
    }

    /// Parses [`PermMode::as_str`] output.
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        match s {
            "perm-stock" | "stock" => Ok(PermMode::Stock),
            "perm-exact" | "exact" => Ok(PermMode::Exact),
            "perm-full" | "full" => Ok(PermMode::Full),
            other => Err(CoreError::UnknownMode(other.to_string())),
        }
    }
}

/// Longest session label, in bytes.
pub const MAX_SESSION_LABEL: usize = 64;

/// Checks a session label: 1 to [`MAX_SESSION_LABEL`] bytes of printable ASCII without spaces
/// (`!` to `~`). Labels are not secret (the derivation is keyed by the secret key), but they are
/// stored in session model files: do not put private information into them.
pub fn validate_session_label(label: &str) -> Result<(), CoreError> {
    let bad = |m: String| Err(CoreError::InvalidSessionLabel(m));
    if label.is_empty() {
        return bad("the label is empty".into());
    }
    if label.len() > MAX_SESSION_LABEL {
        return bad(format!(
            "the label has {} bytes, at most {MAX_SESSION_LABEL} are allowed",
            label.len()
        ));
    }
    if let Some(c) = label.chars().find(|c| !c.is_ascii_graphic()) {
        return bad(format!(
            "character {c:?} is not allowed (printable ASCII without spaces only)"
        ));
    }
    Ok(())
}

/// The vocabulary permutation: plaintext token id ↦ ciphertext token id.
#[derive(Clone, Debug)]
pub struct VocabPermutation(pub Permutation);

impl VocabPermutation {
    /// Derives the vocabulary permutation of a key.
    pub fn derive(key: &SecretKey, vocab: usize) -> Self {
        Self(Permutation::random(vocab, &mut key.stream("vocab")))
    }

    /// The per-session re-keying σ_s of session `label`: file ciphertext id ↦ session ciphertext
    /// id. Drawn with [`Permutation::random`] from the stream of derivation label
    /// `"session/{label}/vocab"` (full domain string `"equicrypt/v1/session/{label}/vocab"`;
    /// no other purpose label starts with `session/`, and the map from `label` to the string is
    /// injective). Errors on an invalid label (see [`validate_session_label`]).
    pub fn derive_session_rekey(
        key: &SecretKey,
        label: &str,
        vocab: usize,
    ) -> Result<Permutation, CoreError> {
        validate_session_label(label)?;
        Ok(Permutation::random(
            vocab,
            &mut key.stream(&format!("session/{label}/vocab")),
        ))
    }

    /// The composed permutation of session `label`: plaintext id `p` ↦ `σ_s(π(p))`, the ids a
    /// session model (written by `equicrypt rekey`) reads and writes.
    pub fn derive_session(key: &SecretKey, label: &str, vocab: usize) -> Result<Self, CoreError> {
        let sigma = Self::derive_session_rekey(key, label, vocab)?;
        let pi = Self::derive(key, vocab);
        Ok(Self(sigma.after(&pi.0)))
    }

    /// Plaintext id → ciphertext id. Errors on ids outside the vocabulary.
    pub fn encrypt_id(&self, id: u32) -> Result<u32, CoreError> {
        self.check(id)?;
        Ok(self.0.apply(id))
    }

    /// Ciphertext id → plaintext id. Errors on ids outside the vocabulary.
    pub fn decrypt_id(&self, id: u32) -> Result<u32, CoreError> {
        self.check(id)?;
        Ok(self.0.invert(id))
    }

    /// Encrypts a sequence of ids.
    pub fn encrypt_ids(&self, ids: &[u32]) -> Result<Vec<u32>, CoreError> {
        ids.iter().map(|&i| self.encrypt_id(i)).collect()
    }

    /// Decrypts a sequence of ids.
    pub fn decrypt_ids(&self, ids: &[u32]) -> Result<Vec<u32>, CoreError> {
        ids.iter().map(|&i| self.decrypt_id(i)).collect()
    }

    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn check(&self, id: u32) -> Result<(), CoreError> {
        if (id as usize) < self.0.len() {
            Ok(())
        } else {
            Err(CoreError::TokenOutOfRange {
                id,
                vocab: self.0.len(),
            })
        }
    }
}

/// The permutation of the residual stream (embedding columns, norm gains, …).
#[derive(Clone, Debug)]
pub struct ResidualPermutation(pub Permutation);

/// Transforms of one transformer block.
#[derive(Clone, Debug)]
pub struct LayerTransforms {
    /// FFN intermediate permutation (gate/up rows, down columns).
    pub ffn: Permutation,
    /// New position of every query-head row: `q_rows.apply(h*hd + j)`.
    pub q_rows: Permutation,
    /// New position of every key-head row.
    pub k_rows: Permutation,
    /// New position of every value-head row (kv head move plus within-head dims).
    pub v_rows: Permutation,
    /// New position of every attention-output column (query head move plus the V dims of its kv head).
    pub o_cols: Permutation,
    /// Sign of each Q row *before* moving (`true` = negate), indexed by original row.
    pub q_negate: Vec<bool>,
    /// Sign of each K row before moving, indexed by original row.
    pub k_negate: Vec<bool>,
}

/// How one tensor is rewritten. Rows are the output axis (`ne1`), columns the input axis (`ne0`).
#[derive(Clone, Debug, Default)]
pub struct TensorTransform {
    /// New position of each row, if rows move.
    pub rows: Option<Permutation>,
    /// New position of each column (or element, for 1-D tensors), if columns move.
    pub cols: Option<Permutation>,
    /// Rows to negate (indexed by original row), applied before moving.
    pub negate_rows: Option<Vec<bool>>,
    /// Columns (elements of a 1-D tensor, e.g. a bias) to negate, indexed by original column,
    /// applied before moving; lossless only for float storage.
    pub negate_cols: Option<Vec<bool>>,
}

impl TensorTransform {
    /// Whether the tensor is left untouched.
    pub fn is_identity(&self) -> bool {
        self.rows.is_none()
            && self.cols.is_none()
            && self.negate_rows.is_none()
            && self.negate_cols.is_none()
    }
}

/// The complete, key-derived plan for one LLaMA-family model.
#[derive(Clone, Debug)]
pub struct LlamaPlan {
    /// Configuration the plan was made for.
    pub config: LlamaConfig,
    /// Which key space the plan draws from.
    pub mode: PermMode,
    /// Token id permutation.
    pub vocab: VocabPermutation,
    /// Residual stream permutation.
    pub residual: ResidualPermutation,
    /// Per-layer transforms.
    pub layers: Vec<LayerTransforms>,
}

/// A permutation of `0..n` (n a multiple of 32) that moves values only inside aligned
/// [`LANE_GROUP`]-groups (`Stock`), only inside 32-groups (`Exact`) or also moves the 32-groups
/// (`Full`). Exact and Full draw exactly what they drew before Stock existed (golden vectors).
fn block_structured(
    key: &SecretKey,
    label: &str,
    n: usize,
    mode: PermMode,
    exact_group: usize,
) -> Result<Permutation, CoreError> {
    if !n.is_multiple_of(QUANT_BLOCK) {
        return Err(CoreError::UnsupportedShape(format!(
            "{label}: size {n} is not a multiple of {QUANT_BLOCK}"
        )));
    }
    let mut rng = key.stream(label);
    let group = match mode {
        PermMode::Stock => LANE_GROUP,
        PermMode::Exact => exact_group,
        PermMode::Full => QUANT_BLOCK,
    };
    let groups = n / group;
    let outer = match mode {
        PermMode::Stock | PermMode::Exact => Permutation::identity(groups),
        PermMode::Full => Permutation::random(groups, &mut rng),
    };
    let inner: Vec<Permutation> = (0..groups)
        .map(|_| Permutation::random(group, &mut rng))
        .collect();
    Ok(Permutation::blocked(&outer, &inner))
}

/// Sub-block sizes an [`PermMode::Exact`] plan can keep permutations inside: 32 (legacy types,
/// Q4_K, Q5_K) or 16 (Q2_K, Q3_K, Q6_K).
pub const EXACT_GROUPS: [usize; 2] = [QUANT_BLOCK, 16];

impl LlamaPlan {
    /// Derives the plan for `shape` from `key`, for files whose finest quantization sub-block is
    /// 32 values (every legacy type, Q4_K, Q5_K, floats).
    pub fn derive(key: &SecretKey, config: LlamaConfig, mode: PermMode) -> Result<Self, CoreError> {
        Self::derive_for_sub_block(key, config, mode, QUANT_BLOCK)
    }

    /// Derives the plan when the finest quantization sub-block of any tensor in the file is
    /// `sub_block` values (16 for files with Q2_K, Q3_K or Q6_K tensors): [`PermMode::Exact`]
    /// then permutes inside `sub_block`-groups (for 32 it draws exactly what [`Self::derive`]
    /// draws). [`PermMode::Stock`] (4-groups) and [`PermMode::Full`] do not depend on it.
    pub fn derive_for_sub_block(
        key: &SecretKey,
        config: LlamaConfig,
        mode: PermMode,
        sub_block: usize,
    ) -> Result<Self, CoreError> {
        config.validate_for_plan()?;
        if !EXACT_GROUPS.contains(&sub_block) {
            return Err(CoreError::UnsupportedShape(format!(
                "quantization sub-block of {sub_block} values (expected 32 or 16)"
            )));
        }
        let vocab = VocabPermutation::derive(key, config.vocab_size);
        let residual = ResidualPermutation(block_structured(
            key,
            "residual",
            config.d_model,
            mode,
            sub_block,
        )?);
        let layers = (0..config.n_layer)
            .map(|l| Self::derive_layer(key, &config, mode, l, sub_block))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config,
            mode,
            vocab,
            residual,
            layers,
        })
    }

    fn derive_layer(
        key: &SecretKey,
        s: &LlamaConfig,
        mode: PermMode,
        l: usize,
        sub_block: usize,
    ) -> Result<LayerTransforms, CoreError> {
        let hd = s.head_dim;
        let group = s.group();
        let ffn = block_structured(key, &format!("ffn/{l}"), s.d_ff, mode, sub_block)?;

        // Head movement: kv heads, and query heads inside each group.
        let mut heads_rng = key.stream(&format!("heads/{l}"));
        let (kv_perm, q_in_group): (Permutation, Vec<Permutation>) = match mode {
            PermMode::Stock | PermMode::Exact => (
                Permutation::identity(s.n_kv_head),
                vec![Permutation::identity(group); s.n_kv_head],
            ),
            PermMode::Full => {
                let kv = Permutation::random(s.n_kv_head, &mut heads_rng);
                let q = (0..s.n_kv_head)
                    .map(|_| Permutation::random(group, &mut heads_rng))
                    .collect();
                (kv, q)
            }
        };
        // New index of query head h = g*group + j.
        let q_head_perm = Permutation::blocked(&kv_perm, &q_in_group);

        // Within-head dims of V (and O's columns), one map per kv head.
        let v_dims: Vec<Permutation> = (0..s.n_kv_head)
            .map(|g| block_structured(key, &format!("vo/{l}/{g}"), hd, mode, sub_block))
            .collect::<Result<_, _>>()?;

        // RoPE pair signs per kv head.
        let mut sign_rng = key.stream(&format!("qk-signs/{l}"));
        let pair_signs: Vec<Vec<bool>> = (0..s.n_kv_head)
            .map(|_| {
                (0..hd / 2)
                    .map(|_| rand_core::RngCore::next_u32(&mut sign_rng) & 1 == 1)
                    .collect()
            })
            .collect();

        let identity_hd = Permutation::identity(hd);
        let q_rows = Permutation::blocked(&q_head_perm, &vec![identity_hd.clone(); s.n_head]);
        let k_rows = Permutation::blocked(&kv_perm, &vec![identity_hd; s.n_kv_head]);
        let v_rows = Permutation::blocked(&kv_perm, &v_dims);
        let o_inner: Vec<Permutation> = (0..s.n_head).map(|h| v_dims[h / group].clone()).collect();
        let o_cols = Permutation::blocked(&q_head_perm, &o_inner);

        let layout = s.rope_layout;
        let expand = |g: usize| -> Vec<bool> {
            (0..hd)
                .map(|j| pair_signs[g][layout.pair_of(j, hd)])
                .collect::<Vec<_>>()
        };
        let q_negate = (0..s.n_head).flat_map(|h| expand(h / group)).collect();
        let k_negate = (0..s.n_kv_head).flat_map(expand).collect();
        Ok(LayerTransforms {
            ffn,
            q_rows,
            k_rows,
            v_rows,
            o_cols,
            q_negate,
            k_negate,
        })
    }

    /// The transform of the tensor called `name` in a GGUF `llama` model: the name is mapped to
    /// its role by [`LlamaFamily`], then [`LlamaPlan::transform_for_role`].
    pub fn transform_for(&self, name: &str) -> Result<TensorTransform, CoreError> {
        let role = LlamaFamily
            .role_of(name)
            .ok_or_else(|| CoreError::UnsupportedTensor(name.to_string()))?;
        self.transform_for_role(role)
    }

    /// The transform of the tensor with `role`. Roles the LLaMA family has no rule for (biases,
    /// Q/K norms) and layers past the model's are errors naming the tensor (by its GGUF name).
    pub fn transform_for_role(&self, role: TensorRole) -> Result<TensorTransform, CoreError> {
        use TensorRole as R;
        let res = || Some(self.residual.0.clone());
        let unsupported = || CoreError::UnsupportedTensor(LlamaFamily.name_of(role));
        let layer = |l: usize| self.layers.get(l).ok_or_else(unsupported);
        let t = match role {
            R::TokenEmbedding | R::Output => TensorTransform {
                rows: Some(self.vocab.0.clone()),
                cols: res(),
                negate_rows: None,
                negate_cols: None,
            },
            R::OutputNorm => TensorTransform {
                cols: res(),
                ..Default::default()
            },
            R::RopeFreqs => TensorTransform::default(),
            // Q/K head dims are never moved, only whole RoPE pairs sign-flipped, and a per-head
            // RMSNorm commutes with sign flips (rule 4): the shared gains stay as they are.
            R::AttnQNorm(l) | R::AttnKNorm(l) => {
                layer(l)?;
                TensorTransform::default()
            }
            R::AttnNorm(l) | R::FfnNorm(l) | R::PostAttnNorm(l) | R::PostFfnNorm(l) => {
                layer(l)?;
                TensorTransform {
                    cols: res(),
                    ..Default::default()
                }
            }
            R::AttnQ(l) => {
                let lt = layer(l)?;
                TensorTransform {
                    rows: Some(lt.q_rows.clone()),
                    cols: res(),
                    negate_rows: Some(lt.q_negate.clone()),
                    negate_cols: None,
                }
            }
            R::AttnK(l) => {
                let lt = layer(l)?;
                TensorTransform {
                    rows: Some(lt.k_rows.clone()),
                    cols: res(),
                    negate_rows: Some(lt.k_negate.clone()),
                    negate_cols: None,
                }
            }
            R::AttnV(l) => TensorTransform {
                rows: Some(layer(l)?.v_rows.clone()),
                cols: res(),
                negate_rows: None,
                negate_cols: None,
            },
            R::AttnOutput(l) => TensorTransform {
                rows: res(),
                cols: Some(layer(l)?.o_cols.clone()),
                negate_rows: None,
                negate_cols: None,
            },
            R::FfnGate(l) | R::FfnUp(l) => TensorTransform {
                rows: Some(layer(l)?.ffn.clone()),
                cols: res(),
                negate_rows: None,
                negate_cols: None,
            },
            R::FfnDown(l) => TensorTransform {
                rows: res(),
                cols: Some(layer(l)?.ffn.clone()),
                negate_rows: None,
                negate_cols: None,
            },
            // A bias is the output axis of its projection, as a 1-D tensor: it moves (and flips
            // sign) with the projection's rows (rule 1).
            R::AttnQBias(l) => {
                let lt = layer(l)?;
                TensorTransform {
                    cols: Some(lt.q_rows.clone()),
                    negate_cols: Some(lt.q_negate.clone()),
                    ..Default::default()
                }
            }
            R::AttnKBias(l) => {
                let lt = layer(l)?;
                TensorTransform {
                    cols: Some(lt.k_rows.clone()),
                    negate_cols: Some(lt.k_negate.clone()),
                    ..Default::default()
                }
            }
            R::AttnVBias(l) => TensorTransform {
                cols: Some(layer(l)?.v_rows.clone()),
                ..Default::default()
            },
        };
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> LlamaConfig {
        LlamaConfig {
            n_layer: 2,
            d_model: 128,
            d_ff: 256,
            n_head: 4,
            n_kv_head: 2,
            head_dim: 32,
            vocab_size: 100,
            context_length: 256,
            rope_base: 10000.0,
            rms_eps: 1e-5,
            rope_layout: crate::config::RopeLayout::Interleaved,
            rope_scale: 1.0,
        }
    }

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    #[test]
    fn exact_mode_stays_inside_blocks() {
        let p = LlamaPlan::derive(&key(1), shape(), PermMode::Exact).unwrap();
        assert!(p.residual.0.is_within_groups(QUANT_BLOCK));
        assert!(!p.residual.0.is_identity());
        for l in &p.layers {
            assert!(l.ffn.is_within_groups(QUANT_BLOCK));
            assert!(l.o_cols.is_within_groups(QUANT_BLOCK));
            assert!(l.q_rows.is_identity() && l.k_rows.is_identity());
        }
    }

    #[test]
    fn stock_mode_stays_inside_lane_groups() {
        let p = LlamaPlan::derive(&key(1), shape(), PermMode::Stock).unwrap();
        assert!(p.residual.0.is_within_groups(LANE_GROUP));
        assert!(!p.residual.0.is_identity());
        for l in &p.layers {
            assert!(l.ffn.is_within_groups(LANE_GROUP) && !l.ffn.is_identity());
            assert!(l.o_cols.is_within_groups(LANE_GROUP) && !l.o_cols.is_identity());
            assert!(l.v_rows.is_within_groups(LANE_GROUP));
            assert!(l.q_rows.is_identity() && l.k_rows.is_identity());
            assert!(
                l.q_negate.iter().any(|&n| n),
                "sign flips stay on in stock mode"
            );
        }
        assert_eq!(PermMode::default(), PermMode::Stock);
        assert_eq!(PermMode::parse("stock").unwrap(), PermMode::Stock);
        assert_eq!(
            PermMode::parse(PermMode::Stock.as_str()).unwrap(),
            PermMode::Stock
        );
    }

    #[test]
    fn half_split_rope_flips_pairs_i_and_i_plus_half_and_exact_mode_follows_sub_blocks() {
        let mut s = shape();
        s.rope_layout = crate::config::RopeLayout::HalfSplit;
        s.d_model = 96; // query width 128 differs from d_model, as in Gemma 3
        let p = LlamaPlan::derive_for_sub_block(&key(4), s.clone(), PermMode::Exact, 16).unwrap();
        let hd = s.head_dim;
        for l in &p.layers {
            for j in 0..hd / 2 {
                assert_eq!(l.q_negate[j], l.q_negate[j + hd / 2]);
                assert_eq!(l.k_negate[j], l.k_negate[j + hd / 2]);
            }
            assert!(l.ffn.is_within_groups(16) && !l.ffn.is_within_groups(8));
            assert!(l.o_cols.is_within_groups(16));
        }
        assert!(p.residual.0.is_within_groups(16));
        // Sub-block 32 draws exactly what `derive` draws (golden vectors of existing files).
        let a = LlamaPlan::derive_for_sub_block(&key(4), shape(), PermMode::Exact, 32).unwrap();
        let b = LlamaPlan::derive(&key(4), shape(), PermMode::Exact).unwrap();
        assert_eq!(a.residual.0, b.residual.0);
        assert!(LlamaPlan::derive_for_sub_block(&key(4), shape(), PermMode::Exact, 8).is_err());
    }

    #[test]
    fn full_mode_moves_blocks_but_preserves_them() {
        let p = LlamaPlan::derive(&key(2), shape(), PermMode::Full).unwrap();
        assert!(p.residual.0.is_group_preserving(QUANT_BLOCK));
        assert!(p
            .layers
            .iter()
            .all(|l| l.o_cols.is_group_preserving(QUANT_BLOCK)));
    }

    #[test]
    fn gqa_groups_move_together_and_vo_match() {
        let s = shape();
        let hd = s.head_dim;
        let p = LlamaPlan::derive(&key(3), s.clone(), PermMode::Full).unwrap();
        for l in &p.layers {
            for h in 0..s.n_head {
                let g = h / s.group();
                let new_q_head = l.q_rows.apply((h * hd) as u32) as usize / hd;
                let new_kv = l.k_rows.apply((g * hd) as u32) as usize / hd;
                assert_eq!(
                    new_q_head / s.group(),
                    new_kv,
                    "query head left its kv group"
                );
                for j in 0..hd {
                    // O column of (h, j) and V row of (g, j) land on the same within-head dim.
                    let o = l.o_cols.apply((h * hd + j) as u32) as usize % hd;
                    let v = l.v_rows.apply((g * hd + j) as u32) as usize % hd;
                    assert_eq!(o, v);
                    // Q and K share the sign of each RoPE pair.
                    assert_eq!(l.q_negate[h * hd + j], l.k_negate[g * hd + j]);
                    assert_eq!(l.q_negate[h * hd + j], l.q_negate[h * hd + (j ^ 1)]);
                }
            }
        }
    }

    #[test]
    fn derivation_is_deterministic_and_key_dependent() {
        let a = LlamaPlan::derive(&key(4), shape(), PermMode::Exact).unwrap();
        let b = LlamaPlan::derive(&key(4), shape(), PermMode::Exact).unwrap();
        let c = LlamaPlan::derive(&key(5), shape(), PermMode::Exact).unwrap();
        assert_eq!(a.vocab.0, b.vocab.0);
        assert_eq!(a.residual.0, b.residual.0);
        assert_ne!(a.vocab.0, c.vocab.0);
    }

    #[test]
    fn unknown_tensors_and_bad_shapes_are_errors() {
        let p = LlamaPlan::derive(&key(6), shape(), PermMode::Exact).unwrap();
        assert!(p.transform_for("blk.9.attn_q.bias").is_err());
        assert!(p.transform_for("blk.9.attn_q.weight").is_err());
        assert!(p.transform_for("whatever").is_err());
        let mut s = shape();
        s.d_model = 100;
        s.head_dim = 25;
        assert!(LlamaPlan::derive(&key(6), s, PermMode::Exact).is_err());
    }

    #[test]
    fn roles_without_a_rule_are_errors_naming_the_tensor() {
        let p = LlamaPlan::derive(&key(6), shape(), PermMode::Exact).unwrap();
        let named = |r: TensorRole| match p.transform_for_role(r) {
            Err(CoreError::UnsupportedTensor(n)) => n,
            other => panic!("{r:?}: {other:?}"),
        };
        assert_eq!(named(TensorRole::AttnKBias(2)), "blk.2.attn_k.bias");
        let qb = p.transform_for_role(TensorRole::AttnQBias(1)).unwrap();
        let q = p.transform_for_role(TensorRole::AttnQ(1)).unwrap();
        assert_eq!((qb.cols, qb.negate_cols), (q.rows, q.negate_rows));
        assert_eq!(named(TensorRole::AttnQNorm(9)), "blk.9.attn_q_norm.weight");
        assert!(p
            .transform_for_role(TensorRole::AttnQNorm(0))
            .unwrap()
            .is_identity());
        assert_eq!(named(TensorRole::FfnUp(2)), "blk.2.ffn_up.weight");
        // The name-based entry is the family's name → role map in front of the role-based one.
        let by_name = p.transform_for("blk.1.attn_q.weight").unwrap();
        let by_role = p.transform_for_role(TensorRole::AttnQ(1)).unwrap();
        assert_eq!(by_name.rows, by_role.rows);
        assert_eq!(by_name.cols, by_role.cols);
        assert_eq!(by_name.negate_rows, by_role.negate_rows);
    }

    #[test]
    fn session_permutation_composes_and_validates_labels() {
        let k = key(8);
        let pi = VocabPermutation::derive(&k, 50);
        let sigma = VocabPermutation::derive_session_rekey(&k, "alice", 50).unwrap();
        let s = VocabPermutation::derive_session(&k, "alice", 50).unwrap();
        for p in 0..50u32 {
            assert_eq!(s.encrypt_id(p).unwrap(), sigma.apply(pi.0.apply(p)));
            assert_eq!(s.decrypt_id(s.encrypt_id(p).unwrap()).unwrap(), p);
        }
        let bob = VocabPermutation::derive_session(&k, "bob", 50).unwrap();
        assert_ne!(s.0, bob.0, "labels must separate sessions");
        assert_ne!(s.0, pi.0);
        for bad in [
            "",
            "has space",
            "tab\t",
            "ünï",
            &"x".repeat(MAX_SESSION_LABEL + 1),
        ] {
            let e = VocabPermutation::derive_session(&k, bad, 50).unwrap_err();
            assert!(
                matches!(e, CoreError::InvalidSessionLabel(_)),
                "{bad:?}: {e}"
            );
        }
        assert!(VocabPermutation::derive_session(&k, &"x".repeat(MAX_SESSION_LABEL), 50).is_ok());
        assert!(VocabPermutation::derive_session(&k, "user-7/2025:a@b", 50).is_ok());
    }

    /// Golden vectors of the session derivation: part of the key format, must never change.
    #[test]
    fn golden_session_permutation() {
        let mut b = [0u8; 32];
        for (i, v) in b.iter_mut().enumerate() {
            *v = i as u8;
        }
        let k = SecretKey::from_bytes(b);
        let sigma = VocabPermutation::derive_session_rekey(&k, "s1", 12).unwrap();
        assert_eq!(sigma.forward(), GOLDEN_SESSION_S1_12);
        let s = VocabPermutation::derive_session(&k, "s1", 12).unwrap();
        assert_eq!(s.0.forward(), GOLDEN_SESSION_S1_COMPOSED_12);
    }

    const GOLDEN_SESSION_S1_12: &[u32] = &[6, 5, 11, 0, 4, 1, 3, 9, 8, 2, 10, 7];
    const GOLDEN_SESSION_S1_COMPOSED_12: &[u32] = &[3, 5, 8, 1, 7, 6, 2, 10, 11, 9, 0, 4];

    #[test]
    fn vocab_ids_roundtrip_and_range_check() {
        let v = VocabPermutation::derive(&key(7), 50);
        for i in 0..50 {
            assert_eq!(v.decrypt_id(v.encrypt_id(i).unwrap()).unwrap(), i);
        }
        assert!(v.encrypt_id(50).is_err());
    }
}
