"""``python -m disco_fl.cli.main``: the ``disco-fl`` command."""

from disco_fl.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
