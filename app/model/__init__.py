"""Model files: GGUF conversion, tokenizer, loading, the tiny test model. No UI."""
