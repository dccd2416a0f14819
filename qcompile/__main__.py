"""``python -m qcompile ...``: the same CLI as the ``qcompile`` entry point."""
from qcompile.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
