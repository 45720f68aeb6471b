"""`python -m t2f.engine.serve`: t2f-serve (as tests and benchmarks/serve_load.py start it)."""

from .cli import main

if __name__ == "__main__":
    main()
