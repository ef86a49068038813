"""Training: loss, state, optimizer, step and loop."""
