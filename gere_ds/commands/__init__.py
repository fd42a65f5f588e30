"""Command-line layers: one module per `gere-ds <command>`, each with main(argv) -> int."""
