"""qtool: Hugging Face checkpoints to GGUF files llama.cpp runs."""
__version__ = "0.1.0"
