"""Training: the feature cache, the training loop, fit (config to run folder), multi-category runs."""
