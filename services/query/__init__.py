"""The query service: encodes text (or an image) with CLIP and searches Milvus.

GOMP_SPINCOUNT: after a forward pass, torch's OpenMP threads (libgomp) busy-wait for the
next parallel region, by default 300,000 spins: milliseconds of a whole core here. Between
queries that core is what the HTTP server, Redis and Milvus need; the search stage took
4.5-7 ms against 1.8-2.4 ms when measured outside the process. A short spin keeps the
threads hot inside a pass, where regions follow each other within microseconds. Set before
torch (and with it libgomp) is loaded; a value in the environment wins.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
