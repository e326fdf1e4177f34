"""Encode: a model's Prediction as DICOM SEG and TID 1500 SR objects in the source study."""
