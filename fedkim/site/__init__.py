"""Site side: modality encoders, task heads and local training (runs at a hospital)."""
