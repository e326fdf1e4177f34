"""DICOMweb under ``/dicomweb``: STOW-RS, QIDO-RS, WADO-RS (PS3.18)."""

from fastapi import APIRouter

router = APIRouter()
