"""DICOMweb (PS3.18): the client side (STOW-RS to destinations) for now."""
