"""Offline training scripts: each trains one model on real data and writes the model repository."""
