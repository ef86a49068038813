"""Model inputs: image preprocessing, prompts and tokenization."""
