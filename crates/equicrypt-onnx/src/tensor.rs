//! Permuting an ONNX `TensorProto` along one axis, in whichever field holds its data.
//!
//! Convention (as everywhere in equicrypt): a permutation π moves index `i` to `π(i)`, so the
//! rewritten tensor has `out[…, π(i), …] = in[…, i, …]`.

use equicrypt_core::Permutation;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

use crate::OnnxError;

/// Bytes per element of an ONNX data type stored in `raw_data`, for the types we rewrite.
fn element_bytes(data_type: i32) -> Option<usize> {
    let t = DataType::try_from(data_type).ok()?;
    Some(match t {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16 => 2,
        DataType::Double | DataType::Int64 | DataType::Uint64 => 8,
        DataType::Int8 | DataType::Uint8 | DataType::Bool => 1,
        _ => return None,
    })
}

/// Moves `unit`-sized blocks so that block `(o, i)` lands at `(o, π(i))`.
fn permute_blocks<T: Copy>(data: &[T], outer: usize, p: &Permutation, unit: usize) -> Vec<T> {
    let n = p.len();
    let mut out = data.to_vec();
    for o in 0..outer {
        for i in 0..n {
            let src = (o * n + i) * unit;
            let dst = (o * n + p.apply(i as u32) as usize) * unit;
            out[dst..dst + unit].copy_from_slice(&data[src..src + unit]);
        }
    }
    out
}

/// Permutes `t` along `axis` by `p` (whose size must be the axis' size).
pub fn permute_axis(
    t: &mut pb::TensorProto,
    axis: usize,
    p: &Permutation,
) -> Result<(), OnnxError> {
    let bad = |reason: String| OnnxError::Tensor {
        tensor: t.name.clone(),
        reason,
    };
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    if axis >= dims.len() || dims[axis] != p.len() {
        return Err(bad(format!(
            "axis {axis} of shape {:?} does not have size {}",
            t.dims,
            p.len()
        )));
    }
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let count = outer * p.len() * inner;
    if !t.raw_data.is_empty() {
        let eb = element_bytes(t.data_type)
            .ok_or_else(|| bad(format!("data type {} is not supported", t.data_type)))?;
        if t.raw_data.len() != count * eb {
            return Err(bad(format!(
                "raw data holds {} bytes, its shape needs {}",
                t.raw_data.len(),
                count * eb
            )));
        }
        t.raw_data = permute_blocks(&t.raw_data, outer, p, inner * eb);
        return Ok(());
    }
    fn typed<T: Copy>(
        v: &mut Vec<T>,
        count: usize,
        outer: usize,
        p: &Permutation,
        inner: usize,
    ) -> bool {
        if v.len() != count {
            return false;
        }
        *v = permute_blocks(v, outer, p, inner);
        true
    }
    let done = if !t.float_data.is_empty() {
        typed(&mut t.float_data, count, outer, p, inner)
    } else if !t.double_data.is_empty() {
        typed(&mut t.double_data, count, outer, p, inner)
    } else if !t.int64_data.is_empty() {
        typed(&mut t.int64_data, count, outer, p, inner)
    } else if !t.int32_data.is_empty() {
        typed(&mut t.int32_data, count, outer, p, inner)
    } else if !t.uint64_data.is_empty() {
        typed(&mut t.uint64_data, count, outer, p, inner)
    } else {
        count == 0
    };
    if done {
        Ok(())
    } else {
        Err(bad(format!(
            "its data does not hold the {count} elements of its shape"
        )))
    }
}

/// Whether every slice of `t` along `axis` is the same (permuting that axis changes nothing:
/// a shared constant of ones, say). `false` where the data cannot be read.
pub fn is_uniform_along(t: &pb::TensorProto, axis: usize) -> bool {
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    if axis >= dims.len() {
        return false;
    }
    let outer: usize = dims[..axis].iter().product();
    let n = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    fn uniform<T: PartialEq>(v: &[T], outer: usize, n: usize, unit: usize) -> bool {
        if v.len() != outer * n * unit {
            return false;
        }
        (0..outer).all(|o| {
            let base = o * n * unit;
            (1..n).all(|i| v[base..base + unit] == v[base + i * unit..base + (i + 1) * unit])
        })
    }
    if !t.raw_data.is_empty() {
        return element_bytes(t.data_type)
            .is_some_and(|eb| uniform(&t.raw_data, outer, n, inner * eb));
    }
    if !t.float_data.is_empty() {
        // Bit patterns: a NaN equals itself, -0.0 differs from 0.0.
        let bits: Vec<u32> = t.float_data.iter().map(|f| f.to_bits()).collect();
        return uniform(&bits, outer, n, inner);
    }
    if !t.int64_data.is_empty() {
        return uniform(&t.int64_data, outer, n, inner);
    }
    if !t.int32_data.is_empty() {
        return uniform(&t.int32_data, outer, n, inner);
    }
    false
}

/// The values of a float32 tensor (from `raw_data` or `float_data`), or `None` for other types.
pub fn f32_values(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != DataType::Float as i32 {
        return None;
    }
    if !t.raw_data.is_empty() {
        return Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    Some(t.float_data.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[i64], values: &[f32]) -> pb::TensorProto {
        pb::TensorProto {
            name: "t".into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    fn values(t: &pb::TensorProto) -> Vec<f32> {
        if t.raw_data.is_empty() {
            return t.float_data.clone();
        }
        t.raw_data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn rows_and_columns_move_by_the_permutation() {
        let p = Permutation::from_forward(vec![2, 0, 1]).unwrap();
        // [[0,1,2],[3,4,5],[6,7,8]]
        let base: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let mut rows = tensor(&[3, 3], &base);
        permute_axis(&mut rows, 0, &p).unwrap();
        // row 0 → 2, row 1 → 0, row 2 → 1
        assert_eq!(values(&rows), vec![3., 4., 5., 6., 7., 8., 0., 1., 2.]);
        let mut cols = tensor(&[3, 3], &base);
        permute_axis(&mut cols, 1, &p).unwrap();
        assert_eq!(values(&cols), vec![1., 2., 0., 4., 5., 3., 7., 8., 6.]);
        let mut typed = pb::TensorProto {
            float_data: base.clone(),
            raw_data: vec![],
            ..tensor(&[3, 3], &[])
        };
        permute_axis(&mut typed, 1, &p).unwrap();
        assert_eq!(values(&typed), values(&cols));
    }

    #[test]
    fn mismatched_sizes_and_short_data_are_refused() {
        let p = Permutation::identity(4);
        let mut t = tensor(&[3, 3], &[0.0; 9]);
        assert!(permute_axis(&mut t, 0, &p).is_err());
        let mut short = tensor(&[4], &[0.0; 3]);
        let e = permute_axis(&mut short, 0, &p).unwrap_err().to_string();
        assert!(e.contains("`t`"), "{e}");
    }
}
