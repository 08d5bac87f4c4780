//! Content hashes of full blocks, the keys of the prefix cache.
//!
//! A block's hash covers its parent block's hash and its own token ids, so two equal hashes
//! stand for two equal whole prefixes, not just two equal blocks (a hash chain, as in vLLM):
//!
//! ```text
//! tokens  [t0 t1 t2 t3][t4 t5 t6 t7][t8 t9 t10 t11]
//! hashes   h0 = H(ROOT, t0..t3)   h1 = H(h0, t4..t7)   h2 = H(h1, t8..t11)
//! ```
//!
//! Choice of hash: 128 bits from two independent lanes of the multiply-fold mixing step used by
//! wyhash/ahash (one 64×64→128 multiply per 8 bytes of tokens per lane), about 1 ns per token.
//! With 128 bits the chance that any two of 2^32 distinct blocks collide is about 2^-65, so a
//! hash match is treated as a content match without comparing tokens. It is not a
//! cryptographic hash: if tenants must not be able to *engineer* a collision (and so read another
//! tenant's cached KV), switch `hash_block` to SHA-256 (`sha2` is already a dependency), as
//! vLLM's `sha256` option does.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Hash of a full block and, through the chain, of every block before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

impl BlockHash {
    /// The parent of a sequence's first block.
    pub const ROOT: BlockHash = BlockHash(0x243f_6a88_85a3_08d3_1319_8a2e_0370_7344);
}

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;
const P3: u64 = 0x5899_65cc_7537_4cc3;

#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

/// Hash of one block: its parent's hash and its tokens (any count; full blocks in practice).
pub fn hash_block(parent: BlockHash, token_ids: &[u32]) -> BlockHash {
    let mut a = parent.0 as u64 ^ P0;
    let mut b = (parent.0 >> 64) as u64 ^ P1;
    let mut chunks = token_ids.chunks_exact(2);
    for pair in &mut chunks {
        let w = u64::from(pair[0]) | (u64::from(pair[1]) << 32);
        a = fold(a ^ w, P2).rotate_left(23);
        b = fold(b ^ w.rotate_left(17), P3).rotate_left(29);
    }
    if let [last] = chunks.remainder() {
        // Tag the odd token so [x] and [x, 0] differ.
        let w = u64::from(*last) | (1 << 63);
        a = fold(a ^ w, P2).rotate_left(23);
        b = fold(b ^ w.rotate_left(17), P3).rotate_left(29);
    }
    let len = token_ids.len() as u64;
    let a2 = fold(a ^ len, P1 ^ b);
    let b2 = fold(b ^ a2, P0 ^ len);
    BlockHash((u128::from(b2) << 64) | u128::from(fold(a2, P3 ^ b2)))
}

/// Hashes of the full blocks of `token_ids`, starting from `parent`.
pub fn hash_full_blocks(parent: BlockHash, token_ids: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = parent;
    token_ids
        .chunks_exact(block_size)
        .map(|block| {
            parent = hash_block(parent, block);
            parent
        })
        .collect()
}

/// A `Hasher` for maps keyed by [`BlockHash`] or by ids the engine assigns (`SeqId`): a block
/// hash is already well mixed and an id is not chosen by clients, so one multiply-fold replaces
/// SipHash (which costs ~20 ns per lookup, a large part of a 256-sequence step).
#[derive(Default)]
pub struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for other key types; keep it correct, if slow.
        for &byte in bytes {
            self.0 = fold(self.0 ^ u64::from(byte), P0);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = fold(self.0 ^ v, P0);
    }
    fn write_u128(&mut self, v: u128) {
        self.0 ^= (v as u64) ^ ((v >> 64) as u64);
    }
}

/// `HashMap` keyed by block hashes or sequence ids, with [`FoldHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FoldHasher>>;

/// `HashSet` of block hashes or sequence ids, with [`FoldHasher`].
pub type FastSet<K> = HashSet<K, BuildHasherDefault<FoldHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn chain_depends_on_parent_and_every_token() {
        let h0 = hash_block(BlockHash::ROOT, &[1, 2, 3, 4]);
        assert_eq!(h0, hash_block(BlockHash::ROOT, &[1, 2, 3, 4]));
        assert_ne!(h0, hash_block(h0, &[1, 2, 3, 4]));
        assert_ne!(h0, hash_block(BlockHash::ROOT, &[1, 2, 3, 5]));
        assert_ne!(h0, hash_block(BlockHash::ROOT, &[2, 1, 3, 4]));
        assert_ne!(
            hash_block(BlockHash::ROOT, &[7]),
            hash_block(BlockHash::ROOT, &[7, 0])
        );
        assert_ne!(
            hash_block(BlockHash::ROOT, &[]),
            hash_block(BlockHash::ROOT, &[0, 0])
        );
    }

    #[test]
    fn full_blocks_ignore_the_partial_tail() {
        let hs = hash_full_blocks(BlockHash::ROOT, &[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[1], hash_block(hs[0], &[5, 6, 7, 8]));
    }

    #[test]
    fn no_collisions_on_near_identical_blocks() {
        // 200k blocks that differ in one token by a small amount: every 64-bit half is
        // distinct, and so is the bucket index a map would use.
        let mut seen_lo = HashSet::new();
        let mut seen_hi = HashSet::new();
        let mut buckets = vec![0u32; 1 << 12];
        for i in 0..200_000u32 {
            let h = hash_block(BlockHash::ROOT, &[i % 7, i / 7, 3, 3, 3, 3, 3, 3]).0;
            assert!(seen_lo.insert(h as u64));
            assert!(seen_hi.insert((h >> 64) as u64));
            buckets[((h as u64) ^ ((h >> 64) as u64)) as usize & 0xfff] += 1;
        }
        // ~48.8 per bucket on average; a poorly mixed hash piles into few buckets.
        let max = buckets.iter().copied().max().unwrap_or(0);
        assert!(max < 100, "max bucket {max}");
    }
}
