"""PyTorch/HF checkpoints <-> mgjax parameters: readers, name tables, loading."""
