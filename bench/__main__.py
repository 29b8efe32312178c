"""``python -m bench``: see bench/runner.py (and ``python -m bench --help``)."""

from bench.runner import main

if __name__ == "__main__":  # spawned memory-measurement children import this module as __mp_main__
    main()
