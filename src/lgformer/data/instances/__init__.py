"""Referring expressions made from instance-segmentation sets (`lgformer data from-instances`)."""
