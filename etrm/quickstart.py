"""`etrm quickstart` (issue 7 builds this out)."""


def quickstart_command() -> None:
    """Run the whole workflow on a small synthetic set (placeholder)."""
