//! What each encryption mode promises on each engine: bit-identical logits, or equal only to
//! floating-point rounding. The table is measured, not derived; `docs/exactness.md` holds the
//! measurements and the kernel facts behind each cell, and `equicrypt verify` prints the promise
//! beside what it measured (and fails when a promised bit-identity does not hold).

use crate::PermMode;

/// An engine that runs encrypted files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineKind {
    /// equicrypt's own engine: integer sums inside every block, blocks in a fixed order,
    /// order-independent RMSNorm (any x86-64-v3 host).
    Equicrypt,
    /// Stock llama.cpp (llama-cpp-python and `llama-server`) built portably by
    /// `scripts/build-llamacpp.sh`: AVX2 kernels, no AVX-512, no AMX, on any x86 host.
    LlamaCppPortable,
    /// Stock Hugging Face transformers (PyTorch CPU, float32) on a safetensors checkpoint: its
    /// BLAS matmuls reduce over permuted axes in float, so only rounding-level equality holds.
    Transformers,
}

impl EngineKind {
    /// A short human-readable name.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Equicrypt => "equicrypt (ours)",
            EngineKind::LlamaCppPortable => "llama.cpp (portable AVX2 build)",
            EngineKind::Transformers => "transformers (PyTorch CPU, float32)",
        }
    }
}

/// How closely an encrypted file's decrypted logits match the plaintext file's on one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exactness {
    /// Every logit bit-identical, so greedy and seeded sampling give the same tokens.
    BitIdentical,
    /// Equal up to floating-point rounding (reductions run in another order): greedy answers
    /// can differ at near-ties.
    Rounding,
}

impl Exactness {
    /// A short human-readable description.
    pub fn describe(self) -> &'static str {
        match self {
            Exactness::BitIdentical => "bit-identical logits",
            Exactness::Rounding => "equal up to rounding (not bit-identical)",
        }
    }
}

impl PermMode {
    /// What this mode promises on `engine`:
    ///
    /// | mode | equicrypt | llama.cpp portable |
    /// |---|---|---|
    /// | stock | bit-identical | bit-identical |
    /// | exact | bit-identical | rounding |
    /// | full | rounding | rounding |
    pub fn exactness_on(self, engine: EngineKind) -> Exactness {
        match (self, engine) {
            (_, EngineKind::Transformers) => Exactness::Rounding,
            (PermMode::Stock, _) => Exactness::BitIdentical,
            (PermMode::Exact, EngineKind::Equicrypt) => Exactness::BitIdentical,
            (PermMode::Exact, EngineKind::LlamaCppPortable) | (PermMode::Full, _) => {
                Exactness::Rounding
            }
        }
    }

    /// [`PermMode::exactness_on`] for a file whose tensors include K-quants (`k_quants`): in
    /// [`PermMode::Exact`] permutations then cross the 8-value partial sums that K-quant dot
    /// products (candle's and llama.cpp's) add in float, so only rounding-level equality holds;
    /// [`PermMode::Stock`] keeps every 4-group, and with it every float operand.
    pub fn exactness_on_file(self, engine: EngineKind, k_quants: bool) -> Exactness {
        match self {
            PermMode::Exact if k_quants => Exactness::Rounding,
            _ => self.exactness_on(engine),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_mode_is_bit_identical_on_every_engine() {
        for e in [EngineKind::Equicrypt, EngineKind::LlamaCppPortable] {
            assert_eq!(PermMode::default().exactness_on(e), Exactness::BitIdentical);
            assert_eq!(PermMode::Full.exactness_on(e), Exactness::Rounding);
        }
        assert_eq!(
            PermMode::Exact.exactness_on(EngineKind::LlamaCppPortable),
            Exactness::Rounding
        );
        for e in [EngineKind::Equicrypt, EngineKind::LlamaCppPortable] {
            assert_eq!(
                PermMode::Stock.exactness_on_file(e, true),
                Exactness::BitIdentical
            );
            assert_eq!(
                PermMode::Exact.exactness_on_file(e, true),
                Exactness::Rounding
            );
        }
    }
}
