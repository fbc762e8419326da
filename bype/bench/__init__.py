"""`bype bench NAME`: each module here has add_arguments(parser) and run(args) -> int."""
