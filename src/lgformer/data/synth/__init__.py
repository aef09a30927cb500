"""The synthetic referring benchmark: scenes, the referring grammar and its interpreter, the generator."""
