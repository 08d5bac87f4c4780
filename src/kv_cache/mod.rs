//! Paged KV-cache bookkeeping: block pool, block tables, prefix cache.
