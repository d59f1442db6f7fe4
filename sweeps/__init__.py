"""sweep: find the best fine-tuning recipe for a language model, with every trial on record."""

__version__ = "0.1.0"
