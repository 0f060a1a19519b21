"""``python -m metaplast.report``: the ``metaplast-report`` command (:mod:`metaplast.analysis.report`)."""

from metaplast.analysis.report import main

if __name__ == "__main__":
    main()
