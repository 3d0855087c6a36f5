"""twofile: the whole life of a large language model, from text to a parameters file and back."""

__version__ = "0.1.0"
