"""aiwfd: typed AI agents from a YAML file, served as an HTTP API."""

__version__ = "0.1.0"
