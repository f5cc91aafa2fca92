"""The one error type for bad user input; the CLI prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (file, field, argument) described in one line that names what is wrong."""


class Cancelled(Exception):
    """A completion was stopped between two sampler steps because its caller asked to stop."""
