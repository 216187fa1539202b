"""The `eraser` command line: argument parsing only; every subcommand calls a library function."""
