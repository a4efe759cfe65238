"""A chaos run (`make chaos`, `python -m tests.chaos`): kill the stack's parts under load.

A private stack on loopback ports with the tiny model; uploads and searches run while workers,
Redis and the Milvus Lite server are SIGKILLed and restarted; at the end every accepted image
must be indexed exactly once, every job's counts exact and searches equal brute force.
"""
