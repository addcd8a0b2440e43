"""Training: config, data loading and packing, optimizer, the loop, logging."""
