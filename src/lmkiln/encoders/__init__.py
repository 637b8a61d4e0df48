"""BERT-style encoders from Hugging Face directories, fine-tuned for semantic search or classification."""
