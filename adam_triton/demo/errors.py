"""The one exception the demo shows its user as a message rather than a traceback."""


class DemoError(Exception):
    """A problem the user can fix: a bad option value, a missing device or package.

    ``exit_code`` follows argparse: 2 for a bad command line, 1 for anything else.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
