"""corolla: run large language models BitTorrent-style."""

__version__ = "0.1.0"
