"""The one exception type users see."""


class UserError(Exception):
    """A problem the user can fix: bad params, a missing file, no network.

    Stages print its message as one line and exit non-zero, without a traceback.
    """
