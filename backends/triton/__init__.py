"""See the package docstring of qcompile."""
