"""Data sources: the offline demo stimuli and observer, and timm feature extraction."""
