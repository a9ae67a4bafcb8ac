"""The one base of every error a user fixes (bad input or config, a service that does not
answer, resources the cluster lacks, a dead worker, a diverging run).

The CLI prints such an error as its message alone, one line per problem, and exits with its
`exit_code` (README: exit codes); anything else is a bug and gets a traceback with --debug.
A leaf module: every package may import it.
"""


class UserError(Exception):
    """An error whose message says what to change; no traceback is shown for it."""

    exit_code = 2


# Exit codes (README, "Exit codes"): 1 is `data validate`'s "bad rows would stop the run".
CONFIG_OR_INPUT = 2
CLUSTER = 3
SERVICE = 4
DIVERGED = 5
BUG = 70
INTERRUPTED = 130
