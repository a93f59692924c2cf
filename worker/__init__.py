"""The GPU worker: a Celery app, thin tasks, one GPU executor and the diffusers pipeline."""
