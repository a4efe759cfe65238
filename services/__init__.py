"""The clipsearch services: gateway, worker, query, and the local stack runner."""
