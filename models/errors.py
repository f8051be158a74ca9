"""The project's error for a bad setting. It lives at the bottom of the import order so that teacher families,
which find most bad settings first (a wrong pipeline, resolution or shift), can name the key themselves."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid or unknown config key. key is the full dotted path."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def __reduce__(self):
        # Raised in a Ray worker or actor, the error comes back pickled; the default rebuilds it from args (the
        # one joined string), which __init__ cannot take
        return type(self), (self.key, self.message)
