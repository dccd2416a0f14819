"""CLI subcommands, one module each: ``add_arguments(parser)`` and ``run(args) -> dict`` (see qcompile.cli)."""
