"""``python -m metaplast.train``: the ``metaplast-train`` command (:mod:`metaplast.run.train`)."""

from metaplast.run.train import main

if __name__ == "__main__":
    main()
