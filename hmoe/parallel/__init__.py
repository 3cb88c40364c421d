"""Parallelism: the device mesh and the logical-axis rules that shard parameters and activations (`sharding`)."""
