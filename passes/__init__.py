"""Built-in passes, installed as ``graphopt.passes``: one module per pass, registered on import."""
