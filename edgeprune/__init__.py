"""edgeprune: score, slim, fine-tune, export, compile and benchmark CNNs for edge targets."""

__version__ = "0.1.0"
