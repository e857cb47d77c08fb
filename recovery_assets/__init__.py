"""recovery-assets: model-recovery studies of representational alignment."""
