"""The server: an OpenAI-compatible API, the chat, autocomplete and ranking pages."""
