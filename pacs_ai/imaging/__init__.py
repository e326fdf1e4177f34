"""From DICOM series to arrays a model can read, and back."""
