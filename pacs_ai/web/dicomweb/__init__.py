"""DICOMweb under ``/dicomweb``: STOW-RS, QIDO-RS, WADO-RS (PS3.18).

One module per service; this router combines them. QIDO-RS routes come before WADO-RS
ones so that ``/studies/{study}/series`` is a search, not a retrieve.
"""

from fastapi import APIRouter

from pacs_ai.web.dicomweb import qido, stow, wado

router = APIRouter(tags=["DICOMweb"])
router.include_router(stow.router)
router.include_router(qido.router)
router.include_router(wado.router)
