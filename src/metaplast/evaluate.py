"""``python -m metaplast.evaluate``: the ``metaplast-evaluate`` command (:mod:`metaplast.run.evaluate`)."""

from metaplast.run.evaluate import main

if __name__ == "__main__":
    main()
