"""Past one process: losses on a vocabulary shard (tensor-parallel heads), with the collectives they need."""
