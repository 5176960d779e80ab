//! `.npy` files in and out, as tract tensors (`f32`, `i64` and `u8`).

use std::path::Path;

use npyz::WriterBuilder;
use tract_onnx::prelude::*;

use crate::OnnxError;

/// Reads an `.npy` file into a tensor.
pub fn read(path: &Path) -> Result<Tensor, OnnxError> {
    let bad = |reason: String| OnnxError::Npy {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(format!("not an .npy file: {e}")))?;
    if npy.order() != npyz::Order::C {
        return Err(bad("Fortran order is not supported".into()));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = npy.dtype().descr();
    let t = match descr.as_str() {
        "'<f4'" => Tensor::from_shape(
            &shape,
            &npy.into_vec::<f32>().map_err(|e| bad(e.to_string()))?,
        ),
        "'<i8'" => Tensor::from_shape(
            &shape,
            &npy.into_vec::<i64>().map_err(|e| bad(e.to_string()))?,
        ),
        "'|u1'" => Tensor::from_shape(
            &shape,
            &npy.into_vec::<u8>().map_err(|e| bad(e.to_string()))?,
        ),
        other => return Err(bad(format!("dtype {other} is not supported (f4, i8, u1)"))),
    };
    t.map_err(|e| bad(e.to_string()))
}

/// Writes a tensor as `.npy`: `f32` for floats, `i64` for integers.
pub fn write_f32(path: &Path, t: &Tensor) -> Result<(), OnnxError> {
    let bad = |reason: String| OnnxError::Npy {
        path: path.to_path_buf(),
        reason,
    };
    let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
    fn encode<T: npyz::AutoSerialize + Copy>(
        shape: &[u64],
        data: &[T],
    ) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .writer(&mut buf)
            .begin_nd()?;
        w.extend(data.iter().copied())?;
        w.finish()?;
        Ok(buf)
    }
    let buf = if t.datum_type().is_float() {
        let t = t.cast_to::<f32>().map_err(|e| bad(e.to_string()))?;
        encode(&shape, &crate::values::<f32>(&t)?)
    } else {
        let t = t.cast_to::<i64>().map_err(|e| bad(e.to_string()))?;
        encode(&shape, &crate::values::<i64>(&t)?)
    }
    .map_err(|e| bad(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad("no file name".into()))?;
    crate::encrypt::write_atomic(dir, name, &buf)
}
