"""The ``pacs-ai`` subcommands that inspect and act on a node, locally or over HTTP (``--url``).

:mod:`pacs_ai.cli` builds the command from them.
"""
