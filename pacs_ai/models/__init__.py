"""Models: what a model declares (manifest), what it returns (Prediction), and where it is found."""
