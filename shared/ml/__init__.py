"""The ML tier: device policy, model loading, the towers, preprocessing. Only workers and the
query service import it; the gateway never does (no torch there)."""
