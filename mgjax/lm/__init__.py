"""The language models: one decoder for the Llama family, Gemma and Mixtral."""
