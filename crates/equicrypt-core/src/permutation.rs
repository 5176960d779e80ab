//! Permutations of index spaces and the project's own Fisher–Yates shuffle.
//!
//! Convention (see `docs/ee-math.md`): a permutation π acts on a vector as
//! `x'[π(i)] = x[i]`; `forward[i] = π(i)`.

use rand_core::RngCore;

use crate::CoreError;

/// A bijection on `0..n`, stored as its forward map together with its inverse.
///
/// Invariant: `inverse[forward[i]] == i` for every `i`.
#[derive(Clone, PartialEq, Eq)]
pub struct Permutation {
    forward: Vec<u32>,
    inverse: Vec<u32>,
}

impl std::fmt::Debug for Permutation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the map itself: it is derived from a secret key.
        write!(f, "Permutation(n = {})", self.forward.len())
    }
}

impl Permutation {
    /// The identity on `0..n`.
    pub fn identity(n: usize) -> Self {
        let forward: Vec<u32> = (0..n as u32).collect();
        Self {
            inverse: forward.clone(),
            forward,
        }
    }

    /// Builds a permutation from its forward map, checking that it is a bijection.
    pub fn from_forward(forward: Vec<u32>) -> Result<Self, CoreError> {
        let n = forward.len();
        let mut inverse = vec![u32::MAX; n];
        for (i, &p) in forward.iter().enumerate() {
            let slot = inverse
                .get_mut(p as usize)
                .ok_or(CoreError::NotAPermutation { len: n })?;
            if *slot != u32::MAX {
                return Err(CoreError::NotAPermutation { len: n });
            }
            *slot = i as u32;
        }
        Ok(Self { forward, inverse })
    }

    /// Draws a uniformly random permutation of `0..n` with Fisher–Yates (Durstenfeld),
    /// using unbiased rejection sampling on the raw 64-bit stream of `rng`.
    ///
    /// This exact procedure is part of the key format: changing it changes every encrypted model.
    pub fn random(n: usize, rng: &mut impl RngCore) -> Self {
        let mut forward: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = uniform_below(rng, (i + 1) as u64) as usize;
            forward.swap(i, j);
        }
        Self::from_forward(forward).expect("a shuffle of the identity is a bijection")
    }

    /// Number of elements permuted.
    pub fn len(&self) -> usize {
        self.forward.len()
    }

    /// Whether the permutation acts on the empty set.
    pub fn is_empty(&self) -> bool {
        self.forward.is_empty()
    }

    /// `π(i)`.
    #[inline]
    pub fn apply(&self, i: u32) -> u32 {
        self.forward[i as usize]
    }

    /// `π⁻¹(j)`.
    #[inline]
    pub fn invert(&self, j: u32) -> u32 {
        self.inverse[j as usize]
    }

    /// The forward map `i ↦ π(i)`.
    pub fn forward(&self) -> &[u32] {
        &self.forward
    }

    /// The inverse map `j ↦ π⁻¹(j)`.
    pub fn inverse_map(&self) -> &[u32] {
        &self.inverse
    }

    /// The inverse permutation.
    pub fn inverse(&self) -> Self {
        Self {
            forward: self.inverse.clone(),
            inverse: self.forward.clone(),
        }
    }

    /// Whether this is the identity.
    pub fn is_identity(&self) -> bool {
        self.forward.iter().enumerate().all(|(i, &p)| i as u32 == p)
    }

    /// Permutes a slice: `out[π(i)] = x[i]`.
    pub fn permute<T: Clone>(&self, x: &[T]) -> Vec<T> {
        assert_eq!(
            x.len(),
            self.len(),
            "length mismatch in Permutation::permute"
        );
        let mut out = x.to_vec();
        for (i, v) in x.iter().enumerate() {
            out[self.forward[i] as usize] = v.clone();
        }
        out
    }

    /// Composition `self ∘ first`: apply `first`, then `self`.
    pub fn after(&self, first: &Permutation) -> Self {
        assert_eq!(
            self.len(),
            first.len(),
            "length mismatch in Permutation::after"
        );
        let forward = first
            .forward
            .iter()
            .map(|&i| self.forward[i as usize])
            .collect();
        Self::from_forward(forward).expect("composition of bijections")
    }

    /// Builds the permutation of `0..groups*size` that sends group `g` to group `outer(g)`
    /// and position `p` inside a group to `inner[g](p)`:
    /// `π(g*size + p) = outer(g)*size + inner[g](p)`.
    pub fn blocked(outer: &Permutation, inner: &[Permutation]) -> Self {
        assert_eq!(outer.len(), inner.len(), "one inner permutation per group");
        let size = inner.first().map_or(0, Permutation::len);
        let mut forward = Vec::with_capacity(outer.len() * size);
        for (g, inner_g) in inner.iter().enumerate() {
            assert_eq!(inner_g.len(), size, "inner permutations must have one size");
            let base = outer.apply(g as u32) * size as u32;
            forward.extend(inner_g.forward.iter().map(|&p| base + p));
        }
        Self::from_forward(forward).expect("blocked permutation is a bijection")
    }

    /// Whether `π` maps every aligned group of `size` elements onto itself
    /// (so a 32-value quantization block keeps its members and its place).
    pub fn is_within_groups(&self, size: usize) -> bool {
        size > 0
            && self.len().is_multiple_of(size)
            && self
                .forward
                .iter()
                .enumerate()
                .all(|(i, &p)| i / size == p as usize / size)
    }

    /// Whether `π` maps every aligned group of `size` elements onto some aligned group
    /// (whole blocks move, possibly shuffled inside).
    pub fn is_group_preserving(&self, size: usize) -> bool {
        if size == 0 || !self.len().is_multiple_of(size) {
            return false;
        }
        self.forward.chunks(size).all(|chunk| {
            let g = chunk[0] as usize / size;
            chunk.iter().all(|&p| p as usize / size == g)
        })
    }
}

/// Unbiased integer in `0..bound` (`bound >= 1`) by rejection on the raw 64-bit stream.
fn uniform_below(rng: &mut impl RngCore, bound: u64) -> u64 {
    debug_assert!(bound >= 1);
    // Largest multiple of `bound` that fits; values at or above it are rejected.
    let zone = u64::MAX - (u64::MAX % bound + 1) % bound;
    loop {
        let v = rng.next_u64();
        if v <= zone {
            return v % bound;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    proptest! {
        #[test]
        fn random_is_a_bijection(n in 0usize..500, seed in any::<u64>()) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let p = Permutation::random(n, &mut rng);
            let mut seen = vec![false; n];
            for i in 0..n as u32 {
                prop_assert_eq!(p.invert(p.apply(i)), i);
                seen[p.apply(i) as usize] = true;
            }
            prop_assert!(seen.iter().all(|&s| s));
        }

        #[test]
        fn permute_then_inverse_is_identity(n in 1usize..200, seed in any::<u64>()) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let p = Permutation::random(n, &mut rng);
            let x: Vec<u32> = (0..n as u32).map(|v| v * 7 + 1).collect();
            prop_assert_eq!(p.inverse().permute(&p.permute(&x)), x);
        }
    }

    #[test]
    fn from_forward_rejects_non_bijections() {
        assert!(Permutation::from_forward(vec![0, 0]).is_err());
        assert!(Permutation::from_forward(vec![0, 2]).is_err());
        assert!(Permutation::from_forward(vec![1, 0]).is_ok());
    }

    #[test]
    fn uniform_below_is_unbiased_enough() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[uniform_below(&mut rng, 3) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn blocked_and_group_predicates() {
        let outer = Permutation::from_forward(vec![1, 0]).unwrap();
        let inner = vec![
            Permutation::from_forward(vec![1, 0]).unwrap(),
            Permutation::identity(2),
        ];
        let p = Permutation::blocked(&outer, &inner);
        assert_eq!(p.forward(), &[3, 2, 0, 1]);
        assert!(p.is_group_preserving(2));
        assert!(!p.is_within_groups(2));
        let q = Permutation::blocked(&Permutation::identity(2), &inner);
        assert!(q.is_within_groups(2));
    }
}
