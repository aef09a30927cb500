"""Datasets: the REFER release, a custom JSONL format and a synthetic referring benchmark."""
