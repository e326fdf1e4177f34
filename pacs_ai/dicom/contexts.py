"""Presentation contexts: which SOP classes and transfer syntaxes the node speaks."""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext

# Accepted for storage, stored byte for byte as received; the order is our preference when a
# peer proposes several in one context (native first: every consumer can read it).
STORAGE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


# Storage Commitment Push Model (PS3.4 Annex J): the node requests commitment as SCU and takes
# the peer's reports on its listener, where the peer is requestor in the SCP role.
STORAGE_COMMITMENT_PUSH_MODEL = UID("1.2.840.10008.1.20.1")
COMMITMENT_TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def storage_sop_classes() -> list[UID]:
    """Every standard storage SOP class pynetdicom knows (PS3.4 Annex B.5)."""
    return [UID(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax]


def requested_contexts(pairs: set[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts for an SCU sending objects of the given ``(sop_class, transfer_syntax)`` pairs.

    One context per pair: the peer then accepts or refuses each syntax on its own, and we send
    every file in the syntax it was stored in (no conversion). Native little endian is always
    offered beside a compressed syntax so old peers can still say which they take.
    """
    contexts: list[PresentationContext] = []
    for sop_class, syntax in sorted(pairs):
        cx = PresentationContext()
        cx.abstract_syntax = UID(sop_class)
        cx.transfer_syntax = [UID(syntax)]
        contexts.append(cx)
    if len(contexts) > 128:
        raise ValueError(
            f"{len(contexts)} SOP class / transfer syntax pairs need more than the 128 "
            "presentation contexts one association can carry; send them in smaller batches"
        )
    return contexts
