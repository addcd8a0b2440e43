"""Scale rehearsal: the real training step of a config at true shapes on fake tensors and a fake
process group of any world size, and a layout sweep (docs/architecture.md §5.5).

A tool above the library: it drives the model, the parallel layouts and the trainer's data and
optimizer as the trainer does, so it may import all of them; nothing in the library imports it.
"""
