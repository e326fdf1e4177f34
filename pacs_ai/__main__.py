"""``python -m pacs_ai`` is the ``pacs-ai`` command."""

from pacs_ai.cli import main

main()
