"""Training: the trainer (LPT, classic prompt tuning, full fine-tuning), the datasets, and the `lpt` CLI."""
