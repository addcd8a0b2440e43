"""Parallelism applied from outside the model: one DeviceMesh (dp_replicate, dp_shard, pp, tp), TP/SP, PP, FSDP2."""
