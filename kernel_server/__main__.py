"""``python -m kernel_server``: start a djinn_nb kernel server."""
from kernel_server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
