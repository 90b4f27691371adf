"""Data: preprocessing, splits, datasets and the synthetic cohort."""
