"""Text in: the tokenizer and BERT-folder lookup (`tokenizer`, shared by data and model) and sentence-length
statistics (`lengths`). Nothing is imported here, so that the CLI's --help does not load torch."""
