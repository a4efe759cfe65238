"""The public HTTP entry: uploads, jobs, images, search proxy. Never imports torch."""
