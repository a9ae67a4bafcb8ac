"""prefopt: preference optimisation of language models at cluster scale."""

__version__ = "0.1.0"
