//! The GGUF reader's tests.
use super::*;

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

/// One tensor info: name, 2 dims (GGML order), type id, offset 0; then padding to the data.
fn tensor_info(b: &mut Vec<u8>, name: &[u8], dims: [u64; 2], type_id: u32) {
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name);
    b.extend(2u32.to_le_bytes());
    b.extend(dims[0].to_le_bytes());
    b.extend(dims[1].to_le_bytes());
    b.extend(type_id.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
}

#[test]
fn rejects_bad_magic_and_version() {
    assert!(matches!(
        GgufFile::parse_bytes(b"GGML\0\0\0\0"),
        Err(GgufError::BadMagic { .. })
    ));
    let mut b = b"GGUF".to_vec();
    b.extend(7u32.to_le_bytes());
    assert!(matches!(
        GgufFile::parse_bytes(&b),
        Err(GgufError::Version { version: 7, .. })
    ));
}

#[test]
fn huge_counts_are_errors_not_allocations() {
    let b = header(u64::MAX, 1);
    assert!(matches!(
        GgufFile::parse_bytes(&b),
        Err(GgufError::Corrupt { .. })
    ));
    let mut b = header(0, 1);
    b.extend(u64::MAX.to_le_bytes()); // key length
    assert!(matches!(
        GgufFile::parse_bytes(&b),
        Err(GgufError::Corrupt { .. })
    ));
}

#[test]
fn reads_metadata_and_a_tensor() {
    let mut b = header(1, 1);
    let key = b"general.architecture";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key);
    b.extend(8u32.to_le_bytes());
    b.extend(5u64.to_le_bytes());
    b.extend(b"llama");
    tensor_info(&mut b, b"w", [2, 3], 0); // F32
    for i in 0..6 {
        b.extend((i as f32).to_le_bytes());
    }
    let f = GgufFile::parse_bytes(&b).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    let t = f.tensor("w").unwrap();
    assert_eq!((t.rows, t.cols), (3, 2));
    let vals: &[f32] = bytemuck::cast_slice(&t.bytes[..]);
    assert_eq!(vals, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    // Truncate the data: a clear error.
    let cut = &b[..b.len() - 4];
    let err = GgufFile::parse_bytes(cut).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
}

/// A tensor of a type sluice cannot run is refused at open, naming the tensor, the type and
/// the types that are supported.
#[test]
fn an_unsupported_tensor_type_names_the_tensor_and_the_supported_ones() {
    let mut b = header(1, 0);
    tensor_info(&mut b, b"blk.0.ffn_down.weight", [256, 1], 16); // IQ2_XXS
    b.extend([0u8; 66]);
    let err = GgufFile::parse_bytes(&b).unwrap_err().to_string();
    for part in [
        "blk.0.ffn_down.weight",
        "IQ2_XXS",
        "id 16",
        "Q3_K, Q4_K, Q5_K, Q6_K",
    ] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
}
