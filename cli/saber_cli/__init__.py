"""saber_cli: the `saber` command; each component registers its own subcommands."""
