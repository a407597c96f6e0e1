"""``python -m adam_triton demo`` (and ``sweep``): see ``python -m adam_triton --help``."""

from .demo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
