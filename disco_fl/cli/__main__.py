"""``python -m disco_fl.cli``: the ``disco-fl`` command."""

from disco_fl.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
