"""The node's HTTP service: worklist page and API, DICOMweb, admin API, health and metrics."""
