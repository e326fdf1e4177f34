"""What happens to a study after it is received: assemble (now), route and jobs (next)."""
