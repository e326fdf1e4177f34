"""The ``lung-nodule-demo`` model's parts: synthetic data, network, training.

``phantom`` (numpy) makes chest-like CT with nodules and their truth; ``unet`` (torch) holds
the network and its sliding-window inference; ``train`` is the one-command retraining script.
This module holds only what the model and the script must agree on, and imports no torch:
the registry imports the model module, which reads these constants, to list manifests.
"""

from __future__ import annotations

from typing import Final

SPACING_MM: Final = (1.25, 0.7, 0.7)
"""(slice, row, column) spacing the network was trained at: a typical thin-slice chest CT,
so that most series run without resampling."""
SPACING_TOLERANCE: Final = 0.1
"""A series whose spacing is within this fraction of SPACING_MM on every axis runs as it is;
training jitters the spacing by as much, so the network has seen such grids."""
HU_RANGE: Final = (-1000.0, 500.0)
"""Hounsfield units are clipped to this range, then mapped linearly to [-1, 1]."""
BASE_CHANNELS: Final = 8
WEIGHTS: Final = "lung_nodule_demo.pt"
METADATA: Final = "lung_nodule_demo.json"
"""File names of the shipped checkpoint and its metadata in ``pacs_ai/models/weights``."""
