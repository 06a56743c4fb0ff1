"""The API routes' handlers: OpenAI chat and completions, Anthropic Messages, and their output formats."""
