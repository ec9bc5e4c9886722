"""Serving private models behind an OpenAI-compatible API: API keys, usage metering, rate limits."""
