"""The HTTP server of `lmkiln serve`: an OpenAI-compatible API over continuous batching, and a chat page."""
