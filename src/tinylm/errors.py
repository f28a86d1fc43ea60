"""The one exception type for mistakes a user can fix.

Raise `UserError` with a one-line message that names the problem and the fix; the CLI prints it
without a traceback and exits with status 2.
"""


class UserError(Exception):
    """Bad input: a wrong path, config key, value or run dir. The message is shown as-is."""
