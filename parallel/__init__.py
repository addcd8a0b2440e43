"""Parallelism applied from outside the model: one DeviceMesh (pp, dp_replicate, dp_shard, tp), TP/SP, PP, FSDP2."""
