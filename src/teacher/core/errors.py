"""The one exception type a person is meant to read."""


class TeacherError(Exception):
    """A problem the user can fix: the message names the file, the record and what to do.

    Stages and the CLI print it without a traceback and exit non-zero.
    """
