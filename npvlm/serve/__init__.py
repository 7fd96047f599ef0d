"""`npvlm serve`: the OpenAI-compatible HTTP API (app.py) over the continuous-batching engine (engine.py)."""
