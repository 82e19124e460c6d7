"""Export to the Hugging Face format."""
