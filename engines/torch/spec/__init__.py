"""Speculative decoding for the torch engine: proposers (n-gram lookup, a draft model) suggest the next
tokens of a decoding sequence; the target model scores all of them in one forward pass and `verify`
keeps the longest prefix that sampling from the target alone could have produced."""
