"""Batch evaluation on the paper's benchmarks: `runner.run` answers a question file in jitted batches
(resumable, split over hosts) into LLaVA answer JSONL; `scores` computes the local metrics."""
