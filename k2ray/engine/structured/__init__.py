"""Grammar-constrained decoding: response_format schemas and K2 tool-call sections over xgrammar."""
