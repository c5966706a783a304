"""The one exception of the config package."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""
