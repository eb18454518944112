"""What runs the stages: the Celery app, the step runner, the embedded worker, reconcile, the dispatcher thread,
the status document."""
