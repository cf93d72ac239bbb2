"""The OpenAI-compatible HTTP adapter: schemas, conversion to wire records, the app and its actor.

HTTP client -> here -> AsyncEngineClient -> gateway; outputs come back the same way as JSON or SSE.
"""
