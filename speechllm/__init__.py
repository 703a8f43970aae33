"""speechllm: spoken slot filling with speech LLMs (regular, reasoning and hybrid modes)."""

__version__ = "0.1.0"
