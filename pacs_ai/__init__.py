"""pacs-ai: a DICOM/PACS AI integration node.

The package is laid out along the flow of an image through the node::

    dicom/scp.py        receive (C-ECHO, C-STORE)
    storage/            spool files and the index database
    pipeline/assemble   group instances into complete studies
    dicom/scu.py        send (C-ECHO, C-STORE) to peers
    node.py             run all of it as one service
    cli.py              the ``pacs-ai`` admin command
"""

__version__ = "0.1.0"
