//! A GGUF reader over a memory map.
//!
//! Every length and offset read from the file is checked against the file's size before it
//! is used, so a truncated or corrupt file yields a `GgufError` naming the problem, never a
//! panic or an allocation sized by a bogus length. Tensor data is not copied: a tensor is a
//! window of the shared map (`WeightBytes::Mapped`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::kernels::dtype::WeightDType;
use crate::kernels::host::{HostTensor, WeightBytes};

const MAGIC: &[u8; 4] = b"GGUF";
/// No sane file has more entries than this; a larger count means a corrupt header.
const MAX_ENTRIES: u64 = 1 << 24;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot open: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated or corrupt at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: usize,
        what: String,
    },
    #[error("{path}: tensor {name} has type {type_name} (id {id}), which sluice does not support (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q3_K, Q4_K, Q5_K, Q6_K)")]
    UnsupportedType {
        path: PathBuf,
        name: String,
        type_name: &'static str,
        id: u32,
    },
    #[error("{path}: missing tensor {name}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: missing or mistyped metadata key {key}")]
    MissingKey { path: PathBuf, key: String },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) if v >= 0 => Some(v as u64),
            Self::I16(v) if v >= 0 => Some(v as u64),
            Self::I32(v) if v >= 0 => Some(v as u64),
            Self::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v as i64),
            Self::I16(v) => Some(v as i64),
            Self::I32(v) => Some(v as i64),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor lies in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<usize>,
    pub dtype: WeightDType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub len: usize,
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, GgufValue>,
    pub tensors: HashMap<String, GgufTensorInfo>,
    map: Arc<memmap2::Mmap>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, what: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            offset: self.pos,
            what: what.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.corrupt(format!("need {n} bytes, file ends")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count that will size an allocation: it must be plausible given the bytes left, with
    /// each element taking at least `min_elem_bytes`.
    fn count(&mut self, min_elem_bytes: usize, what: &str) -> Result<usize, GgufError> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n > MAX_ENTRIES.max(left) || n.saturating_mul(min_elem_bytes as u64) > left {
            return Err(self.corrupt(format!("{what} count {n} exceeds the file")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.count(1, "string length")?;
        let bytes = self.take(n)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => GgufValue::Bool(self.array::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.corrupt("arrays nested too deep"));
                }
                let elem_ty = self.u32()?;
                let min = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.corrupt(format!("unknown array element type {t}"))),
                };
                let n = self.count(min, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem_ty, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(self.corrupt(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; sluice never writes to model files while serving them.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: &Path, map: Arc<memmap2::Mmap>) -> Result<Self, GgufError> {
        let mut c = Cursor {
            buf: &map[..],
            pos: 0,
            path,
        };
        if c.take(4).ok() != Some(&MAGIC[..]) {
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = c.count(24, "tensor")?;
        let n_kv = c.count(12, "metadata")?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.corrupt(format!("tensor {name} has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = c.u64()?;
                if d == 0 || d > (1 << 40) {
                    return Err(c.corrupt(format!("tensor {name} has dimension {d}")));
                }
                dims.push(d as usize);
            }
            let type_id = c.u32()?;
            let rel_offset = c.u64()?;
            infos.push((name, dims, type_id, rel_offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(|v| v.as_u64())
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = HashMap::with_capacity(infos.len());
        for (name, dims, type_id, rel_offset) in infos {
            let dtype =
                WeightDType::from_ggml_id(type_id).ok_or_else(|| GgufError::UnsupportedType {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    type_name: WeightDType::ggml_name(type_id),
                    id: type_id,
                })?;
            let corrupt = |what: String| GgufError::Corrupt {
                path: path.to_path_buf(),
                offset: data_start,
                what,
            };
            let n_values = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| corrupt(format!("tensor {name}: size overflows")))?;
            let len = dtype
                .row_bytes(dims[0])
                .and_then(|row| row.checked_mul(n_values / dims[0]))
                .ok_or_else(|| {
                    corrupt(format!(
                        "tensor {name}: row of {} values is not a whole number of {dtype} blocks",
                        dims[0]
                    ))
                })?;
            let offset = usize::try_from(rel_offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .filter(|&o| o.checked_add(len).is_some_and(|e| e <= map.len()))
                .ok_or_else(|| {
                    corrupt(format!(
                        "tensor {name} ({len} bytes at data offset {rel_offset}) lies past the end of the file ({} bytes): the file is truncated",
                        map.len()
                    ))
                })?;
            tensors.insert(
                name.clone(),
                GgufTensorInfo {
                    name,
                    dims,
                    dtype,
                    offset,
                    len,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn missing_key(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| self.missing_key(key))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| self.missing_key(key))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(|v| v.as_str())
            .ok_or_else(|| self.missing_key(key))
    }

    /// A string array (tokens, merges).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let arr = self
            .get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| self.missing_key(key))?;
        arr.iter()
            .map(|v| v.as_str().ok_or_else(|| self.missing_key(key)))
            .collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor as rows of its innermost dimension: `rows = product of dims[1..]`,
    /// `cols = dims[0]`.
    pub fn tensor(&self, name: &str) -> Result<HostTensor, GgufError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let cols = info.dims[0];
        Ok(HostTensor {
            dtype: info.dtype,
            rows: info.dims[1..].iter().product(),
            cols,
            bytes: WeightBytes::Mapped {
                map: self.map.clone(),
                offset: info.offset,
                len: info.len,
            },
        })
    }

    /// Parses a GGUF image held in memory (fuzzing, tests).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut map =
            memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(|source| GgufError::Io {
                path: PathBuf::from("<memory>"),
                source,
            })?;
        map[..bytes.len()].copy_from_slice(bytes);
        let map = map.make_read_only().map_err(|source| GgufError::Io {
            path: PathBuf::from("<memory>"),
            source,
        })?;
        // An empty input maps one zero byte; parse only what was given.
        if bytes.is_empty() {
            return Err(GgufError::BadMagic {
                path: PathBuf::from("<memory>"),
            });
        }
        Self::parse(Path::new("<memory>"), Arc::new(map))
    }
}

#[cfg(test)]
mod tests;
