"""The embedded demo model: synthetic K2-format conversations, its tokenizer, training and checkpoint writing."""
