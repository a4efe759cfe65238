"""The `clipsearch` command line: ingest folders, watch jobs and search, over the gateway API."""
