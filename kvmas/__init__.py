"""kvmas: multi-agent LLM systems whose agents talk through KV caches instead of text."""
