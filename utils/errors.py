"""Error messages in one line."""


def first_line(err, limit=200):
    """The first non-empty line of an exception's message (at most `limit` characters), or its
    type's name when the message is empty."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(err).__name__
