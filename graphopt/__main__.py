"""python -m graphopt: the graphopt command."""
from .cli import main

main()
