"""Data: corpora, text and table files, tokenizers, token shards, loaders, task formats and examples."""
