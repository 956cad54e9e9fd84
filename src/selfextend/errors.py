"""Errors shared across layers: each says what is wrong in words a user can act on."""


class UnsupportedModelError(ValueError):
    """The model cannot take SelfExtend; the message names the reason."""


class InputTooLongError(ValueError):
    """No sensible settings make the input fit."""


class CommandError(Exception):
    """A problem with the user's input to the command line or the server, printed without a traceback."""


class NativeBuildError(RuntimeError):
    """A fused C kernel could not be built (no compiler, or it failed); the message says which."""
