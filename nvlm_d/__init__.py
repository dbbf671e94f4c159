"""NVLM-D-72B for Hugging Face transformers."""
