"""The shard jobs: target data prepared into shards, and the memory bank generated, on the shard-job skeleton."""
