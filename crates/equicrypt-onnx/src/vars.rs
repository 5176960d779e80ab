//! Permutation variables: one per channel space of the graph, joined by union–find where two
//! tensors must carry the same permutation (a residual `Add`, a shared constant), and drawn from
//! the key once the whole graph has been walked.
//!
//! A variable is either *free* (any permutation of its size) or the *direct sum* of the
//! permutations of the parts a `Concat` joined. An axis carries a variable through an
//! [`AxisPerm`]: the axis of size `outer · n · inner` is the flattening of three digits, and the
//! permutation acts on the middle one: `(o, i, r) ↦ (o, π(i), r)`. That is how a channel
//! permutation survives `Flatten` (`[N, C, H, W] → [N, C·H·W]`: `inner = H·W`).

use serde::{Deserialize, Serialize};

use equicrypt_core::{Permutation, SecretKey};

/// Index of a permutation variable.
pub type VarId = usize;

/// How a variable acts on one axis: the axis has size `outer · n · inner` (n the variable's
/// size) and the permutation moves the middle digit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AxisPerm {
    /// The variable.
    pub var: VarId,
    /// Copies of the permuted digit before it in row-major order (0: unknown, on a symbolic
    /// axis such as a batch with heads folded into it; such an axis never meets a constant).
    pub outer: usize,
    /// Elements after it in row-major order (the stride of the digit).
    pub inner: usize,
}

impl AxisPerm {
    /// The variable on a whole axis of its own size.
    pub fn plain(var: VarId) -> Self {
        Self {
            var,
            outer: 1,
            inner: 1,
        }
    }
}

/// The definition of a variable's permutation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VarDef {
    /// Any permutation of the variable's size, drawn from the key.
    Free,
    /// The direct sum of its parts in order: a part with a permutation is moved by it (within
    /// its own range), a part without stays in place. Parts are `(permutation, size)`.
    Sum(Vec<(Option<AxisPerm>, usize)>),
    /// The Kronecker product of two variables: index `i·n_b + j ↦ a(i)·n_b + b(j)`. A reshape
    /// that splits an axis into (heads, head dim) or (groups, channels per group) needs its
    /// permutation to have this form.
    Kron(VarId, VarId),
}

/// Union–find over permutation variables.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Vars {
    parent: Vec<VarId>,
    size: Vec<usize>,
    def: Vec<VarDef>,
}

/// Why two variables cannot be joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnifyError {
    /// They act on spaces of different sizes.
    Size(usize, usize),
    /// They are direct sums of different shapes.
    Parts,
}

impl Vars {
    /// A new free variable of size `n`.
    pub fn fresh(&mut self, n: usize) -> VarId {
        self.push(n, VarDef::Free)
    }

    /// A new variable, the Kronecker product of `a` (major) and `b` (minor).
    pub fn kron(&mut self, a: VarId, b: VarId) -> VarId {
        let n = self.size(a) * self.size(b);
        self.push(n, VarDef::Kron(a, b))
    }

    /// Constrains `v` to be a Kronecker product with a major factor of size `major`: returns
    /// the factors, refining a free variable into fresh ones.
    pub fn factor(&mut self, v: VarId, major: usize) -> Result<(VarId, VarId), UnifyError> {
        let r = self.find(v);
        let n = self.size[r];
        if major == 0 || !n.is_multiple_of(major) {
            return Err(UnifyError::Parts);
        }
        match self.def[r].clone() {
            VarDef::Kron(a, b) if self.size(a) == major => Ok((a, b)),
            VarDef::Kron(a, b) => {
                // (a ⊗ b) split at another boundary: one side must factor further.
                let na = self.size(a);
                if major.is_multiple_of(na) {
                    let (b1, b2) = self.factor(b, major / na)?;
                    Ok((self.kron(a, b1), b2))
                } else if na.is_multiple_of(major) {
                    let (a1, a2) = self.factor(a, major)?;
                    Ok((a1, self.kron(a2, b)))
                } else {
                    Err(UnifyError::Parts)
                }
            }
            VarDef::Free => {
                let a = self.fresh(major);
                let b = self.fresh(n / major);
                let k = self.kron(a, b);
                self.parent[r] = k;
                Ok((a, b))
            }
            VarDef::Sum(parts) => {
                // A concatenation split into groups (GroupNorm after a skip connection): each
                // part factors with one shared minor, and the sum of the majors is the major.
                let m = n / major;
                let mut majors = Vec::with_capacity(parts.len());
                let mut minor: Option<VarId> = None;
                for (ap, size) in parts {
                    let ap = ap
                        .filter(|a| a.outer == 1 && a.inner == 1)
                        .ok_or(UnifyError::Parts)?;
                    if !size.is_multiple_of(m) {
                        return Err(UnifyError::Parts);
                    }
                    let (g, r) = self.factor(ap.var, size / m)?;
                    match minor {
                        Some(r0) => self.unify(r0, r)?,
                        None => minor = Some(r),
                    }
                    majors.push((Some(AxisPerm::plain(g)), size / m));
                }
                let minor = minor.ok_or(UnifyError::Parts)?;
                let g = self.sum(majors);
                let k = self.kron(g, minor);
                let root = self.find(v);
                self.parent[root] = k;
                Ok((g, minor))
            }
        }
    }

    /// Constrains `v` to be a direct sum of parts of the given sizes (a `Split` of its axis):
    /// returns one variable per part, refining a free variable into fresh ones.
    pub fn split_into(&mut self, v: VarId, sizes: &[usize]) -> Result<Vec<VarId>, UnifyError> {
        let r = self.find(v);
        if sizes.iter().sum::<usize>() != self.size[r] {
            return Err(UnifyError::Parts);
        }
        match self.def[r].clone() {
            VarDef::Sum(parts)
                if parts.len() == sizes.len()
                    && parts.iter().zip(sizes).all(|(p, &n)| p.1 == n)
                    && parts
                        .iter()
                        .all(|p| p.0.is_some_and(|ap| ap.outer == 1 && ap.inner == 1)) =>
            {
                Ok(parts.iter().map(|p| p.0.expect("checked").var).collect())
            }
            VarDef::Free => {
                let vars: Vec<VarId> = sizes.iter().map(|&n| self.fresh(n)).collect();
                let parts = vars
                    .iter()
                    .zip(sizes)
                    .map(|(&v, &n)| (Some(AxisPerm::plain(v)), n))
                    .collect();
                let s = self.sum(parts);
                self.parent[r] = s;
                Ok(vars)
            }
            _ => Err(UnifyError::Parts),
        }
    }

    /// A new variable, the direct sum of `parts`.
    pub fn sum(&mut self, parts: Vec<(Option<AxisPerm>, usize)>) -> VarId {
        let n = parts.iter().map(|p| p.1).sum();
        self.push(n, VarDef::Sum(parts))
    }

    fn push(&mut self, n: usize, def: VarDef) -> VarId {
        let id = self.parent.len();
        self.parent.push(id);
        self.size.push(n);
        self.def.push(def);
        id
    }

    /// Number of variables created (joined or not).
    pub fn len(&self) -> usize {
        self.parent.len()
    }

    /// Whether no variable was created.
    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    /// The representative of `v`'s class.
    pub fn find(&self, mut v: VarId) -> VarId {
        while self.parent[v] != v {
            v = self.parent[v];
        }
        v
    }

    /// The size of the space `v` permutes.
    pub fn size(&self, v: VarId) -> usize {
        self.size[self.find(v)]
    }

    /// The definition of `v`'s class.
    pub fn def(&self, v: VarId) -> &VarDef {
        &self.def[self.find(v)]
    }

    /// `ap` with its variable replaced by the representative.
    pub fn canonical(&self, ap: AxisPerm) -> AxisPerm {
        AxisPerm {
            var: self.find(ap.var),
            ..ap
        }
    }

    /// Joins two classes: afterwards they draw one permutation.
    pub fn unify(&mut self, a: VarId, b: VarId) -> Result<(), UnifyError> {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return Ok(());
        }
        if self.size[ra] != self.size[rb] {
            return Err(UnifyError::Size(self.size[ra], self.size[rb]));
        }
        match (self.def[ra].clone(), self.def[rb].clone()) {
            (VarDef::Free, _) => self.parent[ra] = rb,
            (_, VarDef::Free) => self.parent[rb] = ra,
            (VarDef::Kron(a1, b1), VarDef::Kron(a2, b2)) => {
                if self.size(a1) == self.size(a2) {
                    self.unify(a1, a2)?;
                    self.unify(b1, b2)?;
                } else {
                    let (x, y) = self.factor(rb, self.size(a1))?;
                    self.unify(a1, x)?;
                    self.unify(b1, y)?;
                }
                let (ra, rb) = (self.find(ra), self.find(rb));
                if ra != rb {
                    self.parent[ra] = rb;
                }
            }
            (VarDef::Sum(pa), VarDef::Sum(pb)) => {
                if pa.len() != pb.len() {
                    return Err(UnifyError::Parts);
                }
                for (x, y) in pa.iter().zip(&pb) {
                    if x.1 != y.1 {
                        return Err(UnifyError::Parts);
                    }
                    match (x.0, y.0) {
                        (None, None) => {}
                        (Some(x), Some(y)) if x.outer == y.outer && x.inner == y.inner => {
                            self.unify(x.var, y.var)?
                        }
                        _ => return Err(UnifyError::Parts),
                    }
                }
                self.parent[ra] = rb;
            }
            (VarDef::Kron(a, _), VarDef::Sum(_)) | (VarDef::Sum(_), VarDef::Kron(a, _)) => {
                let (kron, sum) = if matches!(self.def[ra], VarDef::Kron(..)) {
                    (ra, rb)
                } else {
                    (rb, ra)
                };
                let (x, y) = self.factor(sum, self.size(a))?;
                let VarDef::Kron(a, b) = self.def[kron] else {
                    unreachable!("matched above")
                };
                self.unify(a, x)?;
                self.unify(b, y)?;
                let (ra, rb) = (self.find(ra), self.find(rb));
                if ra != rb {
                    self.parent[ra] = rb;
                }
            }
        }
        Ok(())
    }

    /// Draws every variable's permutation from the key. Free classes use the stream
    /// `"{label}/var/{representative}"`; sums are assembled from their parts.
    pub fn draw(&self, key: &SecretKey, label: &str) -> Vec<Permutation> {
        let mut memo: Vec<Option<Permutation>> = vec![None; self.len()];
        (0..self.len())
            .map(|v| self.draw_one(v, key, label, &mut memo))
            .collect()
    }

    fn draw_one(
        &self,
        v: VarId,
        key: &SecretKey,
        label: &str,
        memo: &mut Vec<Option<Permutation>>,
    ) -> Permutation {
        let r = self.find(v);
        if let Some(p) = &memo[r] {
            return p.clone();
        }
        let p = match &self.def[r] {
            VarDef::Free => {
                let mut rng = key.stream(&format!("{label}/var/{r}"));
                Permutation::random(self.size[r], &mut rng)
            }
            VarDef::Sum(parts) => {
                let mut forward = Vec::with_capacity(self.size[r]);
                let mut offset = 0u32;
                for (ap, n) in parts {
                    match ap {
                        Some(ap) => {
                            let inner = self.draw_one(ap.var, key, label, memo);
                            let full = expand(&inner, ap.outer, ap.inner);
                            forward.extend(full.forward().iter().map(|&j| j + offset));
                        }
                        None => forward.extend(offset..offset + *n as u32),
                    }
                    offset += *n as u32;
                }
                Permutation::from_forward(forward).expect("a direct sum of bijections")
            }
            VarDef::Kron(a, b) => {
                let pa = self.draw_one(*a, key, label, memo);
                let pb = self.draw_one(*b, key, label, memo);
                let nb = pb.len() as u32;
                let forward = (0..pa.len() as u32)
                    .flat_map(|i| (0..nb).map(move |j| (i, j)))
                    .map(|(i, j)| pa.apply(i) * nb + pb.apply(j))
                    .collect();
                Permutation::from_forward(forward).expect("a Kronecker product of bijections")
            }
        };
        memo[r] = Some(p.clone());
        p
    }
}

/// The permutation of a whole axis of size `outer · n · inner` that moves the middle digit by
/// `p`: `(o·n + i)·inner + r ↦ (o·n + p(i))·inner + r`.
pub fn expand(p: &Permutation, outer: usize, inner: usize) -> Permutation {
    if outer == 1 && inner == 1 {
        return p.clone();
    }
    let n = p.len();
    let mut forward = Vec::with_capacity(outer * n * inner);
    for o in 0..outer {
        for i in 0..n {
            let base = ((o * n + p.apply(i as u32) as usize) * inner) as u32;
            forward.extend(base..base + inner as u32);
        }
    }
    Permutation::from_forward(forward).expect("an expanded bijection")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_variables_draw_one_permutation() {
        let key = SecretKey::from_bytes([5; 32]);
        let mut vars = Vars::default();
        let a = vars.fresh(16);
        let b = vars.fresh(16);
        let c = vars.fresh(16);
        vars.unify(a, b).unwrap();
        let p = vars.draw(&key, "t");
        assert_eq!(p[a], p[b]);
        assert_ne!(p[a], p[c]);
        assert_eq!(vars.unify(a, vars.len() - 1), Ok(()));
        let d = vars.fresh(8);
        assert_eq!(vars.unify(a, d), Err(UnifyError::Size(16, 8)));
    }

    #[test]
    fn a_sum_moves_each_part_within_its_range() {
        let key = SecretKey::from_bytes([6; 32]);
        let mut vars = Vars::default();
        let a = vars.fresh(4);
        let s = vars.sum(vec![(Some(AxisPerm::plain(a)), 4), (None, 3)]);
        let p = vars.draw(&key, "t");
        assert_eq!(p[s].len(), 7);
        for i in 0..4 {
            assert_eq!(p[s].apply(i), p[a].apply(i));
        }
        for i in 4..7 {
            assert_eq!(p[s].apply(i), i);
        }
    }

    #[test]
    fn a_factored_variable_moves_heads_and_dims_separately() {
        let key = SecretKey::from_bytes([8; 32]);
        let mut vars = Vars::default();
        let v = vars.fresh(12);
        let (h, d) = vars.factor(v, 3).unwrap();
        let w = vars.fresh(12);
        let (h2, d2) = vars.factor(w, 3).unwrap();
        vars.unify(h, h2).unwrap();
        let p = vars.draw(&key, "t");
        for i in 0..12u32 {
            assert_eq!(p[v].apply(i), p[h].apply(i / 4) * 4 + p[d].apply(i % 4));
        }
        assert_eq!(p[h], p[h2]);
        assert_ne!(p[d], p[d2]);
        // Joining the products joins the factors.
        vars.unify(v, w).unwrap();
        let p = vars.draw(&key, "t");
        assert_eq!(p[v], p[w]);
        assert!(vars.factor(v, 5).is_err());
    }

    #[test]
    fn a_split_variable_is_a_direct_sum_of_fresh_parts() {
        let key = SecretKey::from_bytes([9; 32]);
        let mut vars = Vars::default();
        let v = vars.fresh(10);
        let parts = vars.split_into(v, &[4, 6]).unwrap();
        let p = vars.draw(&key, "t");
        for i in 0..4u32 {
            assert_eq!(p[v].apply(i), p[parts[0]].apply(i));
        }
        for i in 0..6u32 {
            assert_eq!(p[v].apply(4 + i), 4 + p[parts[1]].apply(i));
        }
        assert_eq!(vars.split_into(v, &[4, 6]).unwrap(), parts);
        assert!(vars.split_into(v, &[5, 5]).is_err());
    }

    #[test]
    fn expansion_moves_whole_blocks() {
        let p = Permutation::from_forward(vec![2, 0, 1]).unwrap();
        let e = expand(&p, 2, 2);
        assert_eq!(e.forward(), &[4, 5, 0, 1, 2, 3, 10, 11, 6, 7, 8, 9]);
    }
}
