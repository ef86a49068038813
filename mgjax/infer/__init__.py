"""Generation: prefill + decode with a KV cache, batched and jitted (`generate`)."""
