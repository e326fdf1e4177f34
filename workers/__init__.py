"""Celery entry points. The AI path (inference and delivery tasks) hangs off study completion."""
