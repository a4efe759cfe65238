"""The query service: encodes text (or an image) with CLIP and searches Milvus."""
