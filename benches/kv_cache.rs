//! Block pool and KV-cache manager costs: allocate and free a sequence's blocks, and the
//! prefix-cache lookup of a 1,000-token prompt whose blocks are all cached.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::kv_cache::{BlockPool, CacheConfig, KvCacheManager};

fn manager() -> KvCacheManager {
    let config = CacheConfig {
        block_size: 16,
        num_blocks: 4096,
        enable_prefix_caching: true,
        sliding_window: None,
    };
    KvCacheManager::new(config).unwrap_or_else(|e| panic!("{e}"))
}

fn bench(c: &mut Criterion) {
    let mut pool = BlockPool::new(4096);
    c.bench_function("pool_allocate_free_8_blocks", |b| {
        b.iter(|| {
            let ids = pool.allocate(8).unwrap_or_default();
            pool.free(black_box(ids).into_iter().rev());
        })
    });

    let mut kv = manager();
    c.bench_function("manager_allocate_slots_free_128_tokens", |b| {
        b.iter(|| {
            black_box(kv.allocate_slots(1, 0, 128, None));
            kv.free(1);
        })
    });

    let mut kv = manager();
    let prompt: Vec<u32> = (0..1000).map(|i| i * 7 + 3).collect();
    let hits = kv.computed_blocks(&prompt);
    kv.allocate_slots(1, 0, prompt.len(), Some(&hits));
    kv.cache_full_blocks(1, &prompt, prompt.len());
    assert_eq!(kv.computed_blocks(&prompt).num_computed_tokens, 992);
    c.bench_function("prefix_lookup_1000_tokens", |b| {
        b.iter(|| black_box(kv.computed_blocks(black_box(&prompt))))
    });
    let mut other = prompt.clone();
    other[0] = 1;
    c.bench_function("prefix_lookup_1000_tokens_miss", |b| {
        b.iter(|| black_box(kv.computed_blocks(black_box(&other))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
