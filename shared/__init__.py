"""What every clipsearch service agrees on: settings, schemas, stores, encoder, task names."""
