"""Command-line layers, one module per `gere-ds <command>`, each with ``main(argv) -> int``.

Kept apart from the library so that importing gere_ds never parses arguments or prints.
"""
