//! The client's cipher session: plaintext tokenizer + secret vocabulary permutation.
//!
//! Text is tokenized into plaintext ids, which are mapped through the key's
//! [`VocabPermutation`] into ciphertext ids before leaving the client; ids coming back from the
//! server are ciphertext ids and are inverted before detokenization.
//!
//! Invariants: the permutation has exactly `vocab_size()` entries (checked at construction), and
//! no method panics on untrusted ciphertext ids — out-of-range ids are errors.

use equicrypt_core::{SecretKey, VocabPermutation};

use crate::stream::StreamDecoder;
use crate::tokenizer::GgufTokenizer;
use crate::{ClientError, Result};

/// Tokenizer + vocabulary permutation of one secret key.
#[derive(Debug, Clone)]
pub struct CipherSession {
    tok: GgufTokenizer,
    perm: VocabPermutation,
}

impl CipherSession {
    /// Combines a tokenizer with a permutation; errors unless their sizes agree.
    pub fn new(tok: GgufTokenizer, perm: VocabPermutation) -> Result<Self> {
        if perm.len() != tok.vocab_size() {
            return Err(ClientError::VocabMismatch {
                perm: perm.len(),
                vocab: tok.vocab_size(),
            });
        }
        Ok(Self { tok, perm })
    }

    /// Derives the key's vocabulary permutation for this tokenizer's vocabulary.
    pub fn from_key(tok: GgufTokenizer, key: &SecretKey) -> Self {
        let perm = VocabPermutation::derive(key, tok.vocab_size());
        Self { tok, perm }
    }

    /// The plaintext tokenizer.
    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tok
    }

    /// The vocabulary permutation.
    pub fn permutation(&self) -> &VocabPermutation {
        &self.perm
    }

    /// Tokenizes `text` (see [`GgufTokenizer::encode`]) and encrypts the ids.
    pub fn encrypt_prompt(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let ids = self.tok.encode(text, parse_special)?;
        self.encrypt_ids(&ids)
    }

    /// Plaintext ids → ciphertext ids.
    pub fn encrypt_ids(&self, ids: &[u32]) -> Result<Vec<u32>> {
        Ok(self.perm.encrypt_ids(ids)?)
    }

    /// Ciphertext ids → plaintext ids; an id outside the vocabulary is an error.
    pub fn decrypt_ids(&self, cipher_ids: &[u32]) -> Result<Vec<u32>> {
        Ok(self.perm.decrypt_ids(cipher_ids)?)
    }

    /// Decrypts and detokenizes a whole ciphertext sequence (special tokens rendered, lossy UTF-8).
    pub fn decrypt_text(&self, cipher_ids: &[u32]) -> Result<String> {
        self.tok.decode(&self.decrypt_ids(cipher_ids)?)
    }

    /// The ciphertext ids of the end-of-generation tokens, sorted (what a server needs as stop
    /// ids; it never learns which plaintext tokens they are).
    pub fn eog_cipher_ids(&self) -> Result<Vec<u32>> {
        let mut ids = self.encrypt_ids(self.tok.eog_ids())?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Whether a ciphertext id decrypts to an end-of-generation token.
    pub fn is_eog_cipher(&self, cipher_id: u32) -> Result<bool> {
        Ok(self.tok.is_eog(self.perm.decrypt_id(cipher_id)?))
    }

    /// A streaming decoder for ciphertext ids; control tokens are rendered when
    /// `render_special` is true.
    pub fn decrypt_stream(&self, render_special: bool) -> CipherStreamDecoder<'_> {
        CipherStreamDecoder {
            perm: &self.perm,
            inner: StreamDecoder::with_special(&self.tok, render_special),
        }
    }
}

/// [`StreamDecoder`] over ciphertext ids: each id is decrypted, then detokenized incrementally.
#[derive(Debug, Clone)]
pub struct CipherStreamDecoder<'s> {
    perm: &'s VocabPermutation,
    inner: StreamDecoder<'s>,
}

impl CipherStreamDecoder<'_> {
    /// Decrypts one ciphertext id and returns the text that became complete (possibly empty).
    /// Out-of-range ids are errors and leave the decoder unchanged.
    pub fn push(&mut self, cipher_id: u32) -> Result<String> {
        let id = self.perm.decrypt_id(cipher_id)?;
        self.inner.push(id)
    }

    /// Decrypts one ciphertext id; returns the plaintext id and the newly complete text.
    pub fn push_with_id(&mut self, cipher_id: u32) -> Result<(u32, String)> {
        let id = self.perm.decrypt_id(cipher_id)?;
        Ok((id, self.inner.push(id)?))
    }

    /// Flushes buffered bytes (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        self.inner.finish()
    }
}
