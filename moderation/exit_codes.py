"""Exit codes of the `moderation` command, shared by every subcommand."""

EXIT_OK = 0
EXIT_FAILED_ROWS = 1  # batch: some rows could not be scored
EXIT_USAGE = 2  # bad arguments or input
EXIT_ERROR = 3  # could not load the model, start the server, or reach the remote servers
EXIT_INTERRUPTED = 130  # Ctrl-C
