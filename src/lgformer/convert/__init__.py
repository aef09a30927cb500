"""Converters between the authors' checkpoints / pretrained releases and our layout."""
