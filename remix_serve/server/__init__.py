"""remix-serve: vLLM's OpenAI-compatible server, extended with ReMix routes and metrics (never forked)."""
