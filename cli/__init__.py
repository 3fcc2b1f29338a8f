"""featbank's command line (installed as ``featbank.cli``): one click command per module."""

__all__: list[str] = []
