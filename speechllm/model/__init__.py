"""The speech LLM: frozen Whisper features -> frame-stacking adapter -> LLM with LoRA/QLoRA."""
