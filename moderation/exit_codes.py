"""Exit codes of the `moderation` command, shared by every subcommand.

1 is left to Python itself (an uncaught exception): a crash, worth retrying, never looks like
a job that ran to the end with rows it could not score.
"""

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments or input: rerunning gives the same result
EXIT_ERROR = 3  # could not load the model, start the server, or reach the remote servers
EXIT_FAILED_ROWS = 4  # batch ran to the end; more rows failed than --max-failed-rows allows
EXIT_INTERRUPTED = 130  # Ctrl-C
