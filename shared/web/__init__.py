"""The web tier: what the FastAPI services share (errors as JSON, CORS, metrics, health)."""
