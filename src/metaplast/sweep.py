"""``python -m metaplast.sweep``: the ``metaplast-sweep`` command (:mod:`metaplast.analysis.sweep`)."""

from metaplast.analysis.sweep import main

if __name__ == "__main__":
    main()
