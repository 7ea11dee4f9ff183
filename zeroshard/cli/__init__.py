"""The `zeroshard` command: one module per subcommand (run, estimate, check-config,
consolidate, env), dispatched by main.py."""
