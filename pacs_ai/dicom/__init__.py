"""The DICOM network edge: receive (scp), send (scp's counterpart scu), and what both share."""
