"""The base class of errors a user can act on.

Binaries print these as one line (what, where, what to do) and exit with
status 1; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """Bad input, a missing or mismatched file, a misconfigured stage."""


class ConfigError(UserError):
  """A config value that cannot work: a misspelt key, an unknown preset or
  kind, a value out of range."""
