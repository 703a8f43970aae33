"""Command-line entry points, one per stage step."""
