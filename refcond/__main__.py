"""``python -m refcond``: the same as the ``refcond`` command."""

from refcond.cli import main

if __name__ == "__main__":
    main()
