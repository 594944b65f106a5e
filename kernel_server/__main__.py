"""``python -m kernel_server``: start a djinn_nb kernel server."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
