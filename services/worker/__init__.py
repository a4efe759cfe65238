"""The embedding worker: Celery tasks over a plain decode → encode → upsert pipeline."""
