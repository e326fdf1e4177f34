"""Where received instances live: files in the spool, rows in the index database."""
