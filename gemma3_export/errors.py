"""The one exception type for mistakes a user can make (bad flag, path, checkpoint, bundle, prompt).

The CLI prints its message as one sentence and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message is one clear sentence."""
