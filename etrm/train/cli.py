"""`etrm train` and `etrm presets` (issue 5 builds these out)."""


def train_command() -> None:
    """Train a model (placeholder)."""


def presets_command() -> None:
    """List presets (placeholder)."""
