//! Backend-neutral inference interface.

use crate::error::Result;

/// A causal language model with an internal KV cache.
///
/// Token ids are opaque: for an encrypted model they are ciphertext ids and the logits come out in
/// ciphertext order. Invariant: `position() <= context_length()`; every successful `forward*` call
/// advances `position()` by the number of tokens it consumed, a failed call leaves the state unchanged.
pub trait Engine {
    /// Number of token ids (length of every logit row).
    fn vocab_size(&self) -> usize;
    /// Maximum number of positions the cache can hold.
    fn context_length(&self) -> usize;
    /// Number of positions currently in the cache.
    fn position(&self) -> usize;
    /// Empties the cache (position back to 0).
    fn reset(&mut self);
    /// Runs `tokens` after the cached positions and returns the logits of the last one (`vocab_size`).
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    /// Runs `tokens` and returns the logits of every position, row-major `[tokens.len(), vocab_size]`.
    fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;

    /// Runs `tokens` in chunks of at most `chunk` positions (0 means one chunk) and hands each
    /// position's logits to `on_logits(index_in_tokens, row)`; memory stays `O(chunk * vocab_size)`.
    fn forward_chunked(
        &mut self,
        tokens: &[u32],
        chunk: usize,
        on_logits: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<()> {
        let chunk = if chunk == 0 {
            tokens.len().max(1)
        } else {
            chunk
        };
        let vocab = self.vocab_size();
        let mut base = 0;
        for piece in tokens.chunks(chunk) {
            let logits = self.forward_all(piece)?;
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                on_logits(base + i, row);
            }
            base += piece.len();
        }
        Ok(())
    }
}
