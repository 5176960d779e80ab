//! The 256-bit secret key, its file format, and domain-separated derivation of every transform.
//!
//! Derivation: for a purpose label `L` (e.g. `"vocab"`, `"ffn/3"`), the seed of a ChaCha20 stream is
//! `BLAKE3-keyed(secret, "equicrypt/v1/" ‖ L)`; permutations are drawn from that stream by
//! [`Permutation::random`](crate::Permutation::random). Both steps are fixed forever: golden vectors in
//! the tests pin them.

use std::fmt;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::CoreError;

/// First line of a version-1 key file.
pub const KEY_FILE_HEADER: &str = "equicrypt-key-v1";

/// Domain prefix of every derivation label.
const LABEL_PREFIX: &str = "equicrypt/v1/";

/// A 256-bit secret. Zeroized on drop; its `Debug` output never shows the bytes.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey {
    bytes: [u8; 32],
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(fingerprint = {})", self.fingerprint())
    }
}

/// A non-secret identifier of a key: the first 16 bytes of a keyed hash of a fixed label, in hex.
///
/// Stored in encrypted models so that using a model with the wrong key is detected.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub String);

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl SecretKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self { bytes }
    }

    /// Draws a fresh key from the operating system's RNG.
    pub fn generate() -> Result<Self, CoreError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(Self { bytes })
    }

    /// The key's fingerprint (safe to publish).
    pub fn fingerprint(&self) -> KeyFingerprint {
        let h = blake3::keyed_hash(&self.bytes, b"equicrypt/v1/fingerprint");
        KeyFingerprint(hex::encode(&h.as_bytes()[..16]))
    }

    /// The 32-byte seed of the derivation stream for `label`.
    fn derive_seed(&self, label: &str) -> Zeroizing<[u8; 32]> {
        let mut hasher = blake3::Hasher::new_keyed(&self.bytes);
        hasher.update(LABEL_PREFIX.as_bytes());
        hasher.update(label.as_bytes());
        Zeroizing::new(*hasher.finalize().as_bytes())
    }

    /// A ChaCha20 stream dedicated to one purpose. Distinct labels give independent streams.
    pub fn stream(&self, label: &str) -> ChaCha20Rng {
        ChaCha20Rng::from_seed(*self.derive_seed(label))
    }

    /// Serializes to the version-1 key file text: a header line and 64 hex digits.
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let mut hex_digits = Zeroizing::new(hex::encode(self.bytes));
        let text = Zeroizing::new(format!("{KEY_FILE_HEADER}\n{}\n", hex_digits.as_str()));
        hex_digits.zeroize();
        text
    }

    /// Parses key file text written by [`SecretKey::to_file_text`].
    pub fn from_file_text(text: &str) -> Result<Self, CoreError> {
        let mut lines = text.lines();
        match lines.next() {
            Some(KEY_FILE_HEADER) => {}
            Some(h) if h.starts_with("equicrypt-key-") => {
                return Err(CoreError::KeyFormat(format!(
                    "unsupported key file version '{h}'"
                )))
            }
            _ => {
                return Err(CoreError::KeyFormat(
                    "not an equicrypt key file (missing 'equicrypt-key-v1' header)".into(),
                ))
            }
        }
        let body = lines.next().unwrap_or("").trim();
        if body.len() != 64 {
            return Err(CoreError::KeyFormat(format!(
                "key must be 64 hex digits, found {}",
                body.len()
            )));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(body, &mut bytes)
            .map_err(|_| CoreError::KeyFormat("key is not valid hex".into()))?;
        if lines.any(|l| !l.trim().is_empty()) {
            bytes.zeroize();
            return Err(CoreError::KeyFormat("trailing data after the key".into()));
        }
        Ok(Self { bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::RngCore;

    fn test_key() -> SecretKey {
        let mut b = [0u8; 32];
        for (i, v) in b.iter_mut().enumerate() {
            *v = i as u8;
        }
        SecretKey::from_bytes(b)
    }

    #[test]
    fn file_roundtrip() {
        let k = test_key();
        let t = k.to_file_text();
        let k2 = SecretKey::from_file_text(&t).unwrap();
        assert_eq!(k.fingerprint(), k2.fingerprint());
    }

    #[test]
    fn file_errors_name_the_problem() {
        let e = SecretKey::from_file_text("hello").unwrap_err().to_string();
        assert!(e.contains("not an equicrypt key file"), "{e}");
        let e = SecretKey::from_file_text("equicrypt-key-v9\n00")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported key file version"), "{e}");
        let e = SecretKey::from_file_text("equicrypt-key-v1\nzz")
            .unwrap_err()
            .to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        let bad = format!("equicrypt-key-v1\n{}\n", "g".repeat(64));
        let e = SecretKey::from_file_text(&bad).unwrap_err().to_string();
        assert!(e.contains("not valid hex"), "{e}");
    }

    #[test]
    fn debug_does_not_leak_bytes() {
        let s = format!("{:?}", test_key());
        assert!(!s.contains("000102"), "{s}");
        assert!(s.contains("fingerprint"));
    }

    /// Golden vectors: these values are part of the key format and must never change.
    #[test]
    fn golden_fingerprint_and_streams() {
        let k = test_key();
        assert_eq!(k.fingerprint().0, GOLDEN_FINGERPRINT);
        let mut s = k.stream("vocab");
        assert_eq!(s.next_u64(), GOLDEN_VOCAB_U64);
        let perm = crate::Permutation::random(12, &mut k.stream("vocab"));
        assert_eq!(perm.forward(), GOLDEN_VOCAB12);
        let mut r = k.stream("residual");
        assert_ne!(
            r.next_u64(),
            GOLDEN_VOCAB_U64,
            "labels must separate streams"
        );
    }

    const GOLDEN_FINGERPRINT: &str = "dbed5c34dc0f425c157bf7a12547171a";
    const GOLDEN_VOCAB_U64: u64 = 15899940863358267832;
    const GOLDEN_VOCAB12: &[u32] = &[6, 1, 8, 5, 11, 0, 9, 10, 2, 7, 3, 4];
}
